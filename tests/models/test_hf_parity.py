"""Prefill and paged-decode logits of every supported architecture against transformers."""

import numpy as np
import pytest
import torch

from tests.models.tiny_configs import TINY, save_tiny_model
from xlaserve.checkpoints.loader import load_model
from xlaserve.models.generate import PagedModelRunner

# float32 on both sides; differences come from summation order only. Logits here reach about
# +-5 and differ by at most ~1e-5 (measured), so this is ~4e-6 of their range.
FP32_ATOL = 2e-5
DECODE_STEPS = 16
# Ragged prompt lengths around the page size of 8: inside a page, exactly two pages, one token.
PROMPT_LENS = (37, 16, 1, 9)
PAGE_SIZE = 8


# "stacked": layers run by lax.scan over [L, ...] weights (accelerators); "unstacked": one
# call per layer with fused q/k/v and gate/up weights (the CPU engine, `unstack_layers`), fixed
# by the loader.
LAYOUTS = ("stacked", "per_layer")


@pytest.fixture(
    scope="module",
    params=[(name, layout) for name in sorted(TINY) for layout in LAYOUTS],
    ids=lambda p: "-".join(p),
)
def tiny(request, tmp_path_factory):
    name, layout = request.param
    folder = tmp_path_factory.mktemp(name)
    hf_model = save_tiny_model(name, folder)
    loaded = load_model(str(folder), dtype="float32", layer_layout=layout)
    return name, hf_model, loaded


def hf_logits(hf_model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float().numpy()


def test_prefill_and_paged_decode_match_transformers(tiny):
    name, hf_model, loaded = tiny
    rng = np.random.default_rng(1)
    vocab = loaded.config.vocab_size
    prompts = [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENS]
    runner = PagedModelRunner(
        loaded.model,
        num_seqs=len(prompts),
        max_len=max(PROMPT_LENS) + DECODE_STEPS + 1,
        page_size=PAGE_SIZE,
    )
    # Prefill of all prompts in one ragged batch: every position's logits.
    out = runner.step(prompts, all_logits=True)
    starts = np.cumsum((0, *PROMPT_LENS))
    for s, prompt in enumerate(prompts):
        ours = out.all_logits[starts[s] : starts[s + 1]]
        np.testing.assert_allclose(ours, hf_logits(hf_model, prompt), atol=FP32_ATOL, rtol=0)

    # Paged decode: one greedy token per sequence per step, all sequences together.
    decode_logits = [[row] for row in out.logits]
    sequences = [list(p) for p in prompts]
    for _ in range(DECODE_STEPS):
        next_ids = [int(np.argmax(rows[-1])) for rows in decode_logits]
        for s, token in enumerate(next_ids):
            sequences[s].append(token)
        step = runner.step([[t] for t in next_ids])
        for s, row in enumerate(step.logits):
            decode_logits[s].append(row)
    for s, seq in enumerate(sequences):
        expected = hf_logits(hf_model, seq)[len(prompts[s]) - 1 :]
        np.testing.assert_allclose(
            np.stack(decode_logits[s]), expected, atol=FP32_ATOL, rtol=0, err_msg=f"{name} seq {s}"
        )


# bfloat16 weights (the CPU default where the CPU has bfloat16 dot instructions) with float32
# accumulation must be about as close to transformers' float32 logits as transformers' own
# bfloat16 run (measured max error on logits of +-5: llama3 ours 0.143 vs transformers 0.140,
# qwen2 ours 0.155 vs a larger transformers error); 1.25x leaves room for summation order.
BF16_ERROR_RATIO = 1.25


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_bfloat16_logits_as_close_to_float32_as_transformers_bfloat16(name, layout, tmp_path):
    hf_model = save_tiny_model(name, tmp_path)
    loaded = load_model(str(tmp_path), dtype="bfloat16", layer_layout=layout)
    prompt = np.random.default_rng(2).integers(0, loaded.config.vocab_size, 37).tolist()
    runner = PagedModelRunner(loaded.model, num_seqs=1, max_len=40, page_size=PAGE_SIZE)
    ours = np.asarray(runner.step([prompt], all_logits=True).all_logits, np.float32)
    expected = hf_logits(hf_model, prompt)
    hf_bf16_error = np.abs(hf_logits(hf_model.to(torch.bfloat16), prompt) - expected).max()
    our_error = np.abs(ours - expected).max()
    assert 0 < our_error <= BF16_ERROR_RATIO * hf_bf16_error, (our_error, hf_bf16_error)
