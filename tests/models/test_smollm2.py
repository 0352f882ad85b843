"""The real bundled model: greedy continuations equal transformers' token for token."""

import numpy as np
import torch

from xlaserve.models.generate import PagedModelRunner, greedy_generate

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
    "The chemical symbol for gold is",
    "Translate to French: I like apples.",
    "Water boils at",
    "A haiku about autumn leaves:\n",
]
NEW_TOKENS = 32


def hf_greedy(hf_model, ids: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


def test_greedy_continuations_equal_transformers(smollm2, smollm2_hf):
    tok = smollm2.tokenizer
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the tallest mountain?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompts = [tok(p)["input_ids"] for p in [*PROMPTS, chat]]
    assert len({len(p) for p in prompts}) > 4  # genuinely ragged
    # All prompts share every step (ragged batches); both sides stop after eos.
    eos = smollm2.config.eos_token_ids
    assert eos == (smollm2_hf.generation_config.eos_token_id,)
    ours = greedy_generate(smollm2.model, prompts, NEW_TOKENS, stop_token_ids=eos)
    assert sum(len(o) for o in ours) > 6 * NEW_TOKENS  # most run the full length
    for ids, got in zip(prompts, ours, strict=True):
        assert got == hf_greedy(smollm2_hf, ids, NEW_TOKENS), tok.decode(ids)


def test_prefill_logits_match_transformers(smollm2, smollm2_hf):
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    runner = PagedModelRunner(smollm2.model, num_seqs=1, max_len=len(ids), page_size=16)
    ours = runner.step([ids], all_logits=True).all_logits
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor([ids])).logits[0].numpy()
    # float32 both sides over 30 layers; logits reach ~35 and differ by < 1e-4 (measured).
    np.testing.assert_allclose(ours, ref, atol=5e-4, rtol=0)
