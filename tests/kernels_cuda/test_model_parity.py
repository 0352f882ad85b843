"""The torch model against the JAX model on tiny random checkpoints of every family.

Both load the same HF folder through their own loader; all prompts run as one ragged batch
(prefill with every position's logits, then paged decode steps fed with JAX's greedy tokens).
The torch side uses a shuffled page table, the JAX side contiguous pages.

Tolerance: float32 on both sides, so differences come from summation order only. Logits of
these models reach about +-5; measured differences are 4e-6 (qwen3) to 1.1e-5 (qwen2), with
reference attention and interpreted Triton alike, so FP32_ATOL = 3e-5 (~6e-6 of the range).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.kernels_cuda.conftest import gpu, interpreted_kernels
from tests.models.tiny_configs import TINY, save_tiny_model
from xlaserve.checkpoints.loader import load_model
from xlaserve.kernels_cuda.attention import resolve_attention
from xlaserve.kernels_cuda.loader import TORCH_ARCHITECTURES, hf_tensors_from_jax, load_torch_model
from xlaserve.kernels_cuda.paged import TorchPagedRunner
from xlaserve.models.generate import PagedModelRunner

FP32_ATOL = 3e-5
PROMPT_LENS = (37, 16, 1, 9)  # around the page size of 8: inside, exactly two pages, one token
PAGE_SIZE = 8
DECODE_STEPS = 6


# The families the torch backend runs (it refuses the others at start-up, tested there).
TORCH_TINY = sorted(n for n, (cls, _, _) in TINY.items() if cls.__name__ in TORCH_ARCHITECTURES)


@pytest.fixture(scope="module", params=TORCH_TINY)
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny_model(request.param, folder)
    return request.param, folder, load_model(str(folder), dtype="float32")


def run_both(jax_loaded, torch_model, prompts, steps):
    """Max |logit diff| over prompt and decode positions, and both argmax sequences."""
    max_len = max(map(len, prompts)) + steps + 1
    jax_runner = PagedModelRunner(
        jax_loaded.model, num_seqs=len(prompts), max_len=max_len, page_size=PAGE_SIZE
    )
    order = np.random.default_rng(3).permutation(len(prompts) * -(-max_len // PAGE_SIZE))
    torch_runner = TorchPagedRunner(
        torch_model, num_seqs=len(prompts), max_len=max_len, page_size=PAGE_SIZE, page_order=order
    )
    a, b = jax_runner.step(prompts, all_logits=True), torch_runner.step(prompts, all_logits=True)
    diff = float(np.abs(a.all_logits - b.all_logits).max())
    jax_tokens, torch_tokens = [], []
    for _ in range(steps):
        jax_tokens.append(a.logits.argmax(-1))
        torch_tokens.append(b.logits.argmax(-1))
        feed = [[int(t)] for t in jax_tokens[-1]]
        a, b = jax_runner.step(feed), torch_runner.step(feed)
        diff = max(diff, float(np.abs(a.logits - b.logits).max()))
    return diff, np.stack(jax_tokens), np.stack(torch_tokens)


def prompts_for(vocab: int, lens=PROMPT_LENS) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, vocab, n).tolist() for n in lens]


def test_torch_logits_match_jax(tiny):
    name, folder, jax_loaded = tiny
    torch_loaded = load_torch_model(str(folder), dtype="float32", device="cpu")
    assert torch_loaded.model.attention == "reference"
    prompts = prompts_for(jax_loaded.config.vocab_size)
    diff, jax_tokens, torch_tokens = run_both(jax_loaded, torch_loaded.model, prompts, DECODE_STEPS)
    assert diff <= FP32_ATOL, f"{name}: max |logit diff| {diff:.2e}"
    np.testing.assert_array_equal(torch_tokens, jax_tokens)


@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=interpreted_kernels), pytest.param("cuda", marks=gpu)]
)
@pytest.mark.parametrize("name", ["mistral", "qwen3"])  # sliding window; q/k norm, H=32
def test_triton_attention_in_the_model_matches_jax(name, device, tmp_path):
    pytest.importorskip("triton")
    save_tiny_model(name, tmp_path)
    jax_loaded = load_model(str(tmp_path), dtype="float32")
    torch_loaded = load_torch_model(
        str(tmp_path), dtype="float32", device=device, attention="triton"
    )
    assert torch_loaded.model.attention == "triton"
    prompts = prompts_for(jax_loaded.config.vocab_size, (21, 1, 9))
    diff, jax_tokens, torch_tokens = run_both(jax_loaded, torch_loaded.model, prompts, 3)
    assert diff <= FP32_ATOL, f"{name}: max |logit diff| {diff:.2e}"
    np.testing.assert_array_equal(torch_tokens, jax_tokens)


def test_loaders_refuse_the_same_bad_checkpoints(tmp_path):
    save_tiny_model("qwen2", tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    tensors["model.layers.0.extra.weight"] = np.zeros(2, np.float32)
    save_file(tensors, weights)
    errors = []
    for load in (load_model, load_torch_model):
        with pytest.raises(ValueError, match=r"missing tensor\(s\)") as info:
            load(str(tmp_path), dtype="float32")
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_jax_parameters_convert_to_the_hf_tensors_they_came_from(tiny):
    # The route of dummy presets and orbax stores into torch: exact inverse of the JAX loader.
    _, folder, jax_loaded = tiny
    original = load_file(folder / "model.safetensors")
    converted = hf_tensors_from_jax(jax_loaded)
    if jax_loaded.config.tie_word_embeddings:
        original.pop("lm_head.weight", None)
    assert sorted(converted) == sorted(original)
    for name, array in original.items():
        np.testing.assert_array_equal(converted[name], array, err_msg=name)


def test_attention_choice_is_checked_before_loading():
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        load_torch_model("llama-3-8b", load_format="dummy", attention="flash")
    assert resolve_attention("auto", "cpu") == "reference"  # never the interpreter by default


@interpreted_kernels
def test_triton_can_be_forced_on_the_cpu_only_when_interpreted():
    pytest.importorskip("triton")
    assert resolve_attention("triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="built for the interpreter"):
        resolve_attention("triton", "cuda")


def test_triton_on_cpu_without_the_interpreter_says_how_to_get_it():
    pytest.importorskip("triton")
    code = (
        "from xlaserve.kernels_cuda.attention import resolve_attention\n"
        "try:\n    resolve_attention('triton', 'cpu')\n"
        "except ValueError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "set TRITON_INTERPRET=1 before triton is first imported" in out.stdout
