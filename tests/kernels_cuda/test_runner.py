"""The torch runner under the real scheduler on a tiny model: the JAX model's greedy tokens
through chunked prefill, prefix-cache hits and preemption, with the torch reference attention
and with the Triton kernels (interpreted on the CPU)."""

import numpy as np
import pytest

from tests.kernels_cuda.conftest import interpreted_kernels
from tests.models.tiny_configs import save_tiny_model
from xlaserve import SamplingParams
from xlaserve.checkpoints.loader import load_model
from xlaserve.engine.llm_engine import LLMEngine
from xlaserve.engine.runner_api import KVCacheSpec, RunnerConfig
from xlaserve.engine.scheduler import Scheduler, SchedulerConfig
from xlaserve.kernels_cuda.loader import load_torch_model
from xlaserve.kernels_cuda.runner import TorchModelRunner
from xlaserve.models.generate import greedy_generate

PAGE_SIZE, MAX_LEN, NEW_TOKENS = 4, 64, 8
SHARED = list(range(3, 15))  # 12 tokens = three full pages, reused through the prefix cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral")  # GQA and a sliding window of 12
    save_tiny_model("mistral", folder)
    rng = np.random.default_rng(2)
    prompts = [SHARED + rng.integers(0, 160, n).tolist() for n in (1, 9, 30)]
    prompts.append(rng.integers(0, 160, 5).tolist())
    jax_model = load_model(str(folder), dtype="float32").model
    expected = greedy_generate(jax_model, prompts, NEW_TOKENS, page_size=PAGE_SIZE)
    return folder, prompts, expected


def engine(folder, attention: str, num_pages: int) -> LLMEngine:
    loaded = load_torch_model(str(folder), dtype="float32", attention=attention)
    limits = dict(max_num_seqs=4, max_num_batched_tokens=24, max_model_len=MAX_LEN,
                  page_size=PAGE_SIZE, num_pages=num_pages)  # fmt: skip
    return LLMEngine(
        Scheduler(SchedulerConfig(**limits)),
        TorchModelRunner(
            loaded.model,
            RunnerConfig(**limits),
            KVCacheSpec.for_model(loaded.config, page_size=PAGE_SIZE, dtype="float32"),
        ),
        tokenizer=None,
        vocab_size=loaded.config.vocab_size,
        eos_token_ids=(),
    )


def generate(eng: LLMEngine, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ids = [eng.add_request(None, {"prompt_token_ids": p}, params) for p in prompts]
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    return [done[i].outputs[0].token_ids for i in ids]


@pytest.mark.parametrize(
    "attention", ["reference", pytest.param("triton", marks=interpreted_kernels)]
)
def test_engine_tokens_equal_jax_greedy_with_chunks_and_prefix_hits(tiny, attention):
    folder, prompts, expected = tiny
    eng = engine(folder, attention, num_pages=96)
    assert generate(eng, prompts[:1]) == expected[:1]  # fills the prefix cache
    assert generate(eng, prompts[1:]) == expected[1:]  # the 30-token prompt comes in chunks
    m = eng.get_metrics()
    assert m["prefix_cache_hits"] >= 2 * len(SHARED)
    assert m["kv_pages_free"] == m["kv_pages_total"]


def test_engine_tokens_survive_preemption(tiny):
    folder, prompts, expected = tiny
    eng = engine(folder, "reference", num_pages=MAX_LEN // PAGE_SIZE + 4)  # 20 pages for 4 seqs
    assert generate(eng, prompts) == expected
    assert eng.get_metrics()["preemptions"] > 0
