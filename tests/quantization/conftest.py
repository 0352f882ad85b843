from pathlib import Path

import numpy as np
import pytest

ENGLISH = (Path(__file__).parent / "data" / "english.txt").read_text()


def perplexity(model, token_ids: list[int], kv_cache_dtype: str = "auto") -> float:
    """exp(mean NLL of each next token) over one prefill of the whole text."""
    from xlaserve.models.generate import PagedModelRunner

    runner = PagedModelRunner(
        model, num_seqs=1, max_len=len(token_ids), kv_cache_dtype=kv_cache_dtype
    )
    logits = runner.step([token_ids], all_logits=True).all_logits[:-1].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -logprobs[np.arange(len(token_ids) - 1), token_ids[1:]]
    return float(np.exp(nll.mean()))


@pytest.fixture(scope="session")
def english_ids(smollm2):
    return smollm2.tokenizer(ENGLISH)["input_ids"]
