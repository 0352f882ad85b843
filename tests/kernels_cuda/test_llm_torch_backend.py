"""The whole engine on the torch backend with the real SmolLM2-135M-Instruct: the same greedy
tokens as the JAX backend (the session's `smollm2_llm`), penalties, logit bias and logprobs
with the same meaning, and seeded sampling independent of the batch."""

import numpy as np
import pytest

from tests.conftest import ENGINE_KWARGS
from xlaserve import LLM, SamplingParams
from xlaserve.config import EngineArgs

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "1, 2, 3, 4, 5,",
    "Translate to French: I like apples.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "import numpy as np\n\ndef softmax(x):",
    "Q: What is 12 times 12?\nA:",
    # Long enough to be prefilled in chunks (256-token budget, shared with the others).
    " ".join(f"Item {i}: a note about topic number {i}." for i in range(20)),
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
# Logprobs are float32 log-softmaxes of logits that agree to ~2e-4 (see parity results).
LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def torch_llm():
    return LLM("smollm2-135m-instruct", backend="torch", **ENGINE_KWARGS)


def tokens_of(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_tokens_are_identical_across_backends(smollm2_llm, torch_llm):
    jax_tokens = tokens_of(smollm2_llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    torch_tokens = tokens_of(torch_llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert torch_tokens == jax_tokens
    m = torch_llm.get_metrics()
    assert m["kv_pages_free"] == m["kv_pages_total"] and m["num_running"] == 0
    assert torch_llm.engine.dtype == "float32"


def test_penalties_bias_and_logprobs_mean_the_same(smollm2_llm, torch_llm):
    params = SamplingParams(
        temperature=0.0, max_tokens=12, repetition_penalty=1.3, presence_penalty=0.4,
        frequency_penalty=0.2, logit_bias={13: -100.0, 30: 2.0}, logprobs=3, prompt_logprobs=2,
    )  # fmt: skip
    prompts = PROMPTS[:2]
    jax_out = smollm2_llm.generate(prompts, params, use_tqdm=False)
    torch_out = torch_llm.generate(prompts, params, use_tqdm=False)
    assert tokens_of(torch_out) == tokens_of(jax_out)
    assert tokens_of(torch_out) != tokens_of(smollm2_llm.generate(prompts, GREEDY, use_tqdm=False))
    for a, b in zip(jax_out, torch_out, strict=True):
        for pos_a, pos_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert list(pos_a) == list(pos_b)  # same ids, same ranks
            lp_a = [x.logprob for x in pos_a.values()]
            np.testing.assert_allclose([x.logprob for x in pos_b.values()], lp_a, atol=LOGPROB_ATOL)
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        for pos_a, pos_b in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            lp_a = [x.logprob for x in pos_a.values()]
            np.testing.assert_allclose([x.logprob for x in pos_b.values()], lp_a, atol=LOGPROB_ATOL)


def test_seeded_sample_is_the_same_alone_and_in_a_busy_batch(torch_llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12)
    alone = tokens_of(torch_llm.generate(PROMPTS[5], seeded, use_tqdm=False))[0]
    others = [
        SamplingParams(temperature=1.0, max_tokens=10),
        SamplingParams(temperature=0.7, min_p=0.1, presence_penalty=1.0, max_tokens=14),
        SamplingParams(temperature=1.2, seed=7, repetition_penalty=1.3, max_tokens=6),
    ]
    busy = torch_llm.generate(PROMPTS[:3] + [PROMPTS[5]], [*others, seeded], use_tqdm=False)
    assert tokens_of(busy)[3] == alone
    unseeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=12)
    draws = tokens_of(torch_llm.generate([PROMPTS[5]] * 3, unseeded, use_tqdm=False))
    assert len({tuple(d) for d in draws + [alone]}) > 1  # randomness is real


def test_backend_option_is_validated():
    with pytest.raises(ValueError, match=r"backend must be one of \('jax', 'torch'\), got 'tf'"):
        EngineArgs(backend="tf")
    with pytest.raises(ValueError, match="backend 'torch' runs on one device"):
        LLM("llama-3-8b", backend="torch", load_format="dummy", tensor_parallel_size=2)
