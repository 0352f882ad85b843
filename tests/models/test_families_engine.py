"""Gemma 3 and Qwen3-MoE (tiny random configs) through the offline engine: greedy outputs with
prefix caching and chunked prefill equal the model-level greedy loop; the torch parity backend
refuses them at start-up."""

import numpy as np
import pytest

from tests.conftest import TEST_TOKEN_BUCKETS
from tests.models.tiny_configs import save_tiny_model
from xlaserve import LLM, SamplingParams
from xlaserve.checkpoints.loader import load_model
from xlaserve.models.generate import greedy_generate

NEW_TOKENS = 8


@pytest.fixture(scope="module", params=["gemma3", "qwen3_moe"])
def tiny_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny_model(request.param, folder)
    return folder


@pytest.mark.slow
def test_engine_greedy_equals_model_loop_with_prefix_caching_and_chunks(tiny_folder):
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 160, 24).tolist()  # a prefix longer than the window of 12
    prompts = [shared + rng.integers(3, 160, n).tolist() for n in (5, 17, 30)]
    loaded = load_model(str(tiny_folder), dtype="float32", with_tokenizer=False)
    expected = greedy_generate(loaded.model, prompts, NEW_TOKENS, stop_token_ids=())
    llm = LLM(
        str(tiny_folder), dtype="float32", max_model_len=128, max_num_seqs=4,
        max_num_batched_tokens=16, enable_prefix_caching=True, enable_chunked_prefill=True,
        token_buckets=TEST_TOKEN_BUCKETS,
    )  # fmt: skip
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for _ in range(2):  # the second round hits the prefix cache
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        assert [list(o.outputs[0].token_ids) for o in outs] == expected


def test_torch_backend_refuses_new_families(tiny_folder):
    with pytest.raises(ValueError, match="torch backend does not support architecture"):
        LLM(str(tiny_folder), backend="torch", dtype="float32")
