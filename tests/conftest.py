import os

# Tests run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Triton reads TRITON_INTERPRET when a kernel is defined, and any earlier import of triton in
# the session (a dependency may do it) fixes it; without an NVIDIA GPU, interpret from the start.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf():
    from xlaserve.checkpoints.presets import resolve_bundled

    return resolve_bundled("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """xlaserve's float32 SmolLM2-135M-Instruct, loaded once per test session."""
    from xlaserve.checkpoints.loader import load_model

    return load_model(str(smollm2_gguf), dtype="float32")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' float32 model from the same GGUF: the numerical reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


# Token buckets of the test engines: 1, then 16 up to the token budget (always added). The
# generation default (1, 2, 4, ...) adds two to four forward graphs to every engine built; a
# lone decode keeps its one-token graph. All small buckets are tested where they are the subject
# (tests/engine/test_async_scheduling.py).
TEST_TOKEN_BUCKETS = (1, 16, 32, 64, 128)
# One engine configuration shared by the engine tests (compiles once per session).
ENGINE_KWARGS = dict(
    dtype="float32", max_model_len=512, max_num_seqs=16, max_num_batched_tokens=256,
    token_buckets=TEST_TOKEN_BUCKETS,
)  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_llm():
    """The offline LLM on SmolLM2 with prefix caching on and a roomy KV pool."""
    from xlaserve import LLM

    return LLM("smollm2-135m-instruct", **ENGINE_KWARGS)
