"""Async scheduling: the host schedules step N+1 while step N runs, and the outputs, stop
conditions, preemptions, aborts and freed pages are exactly those of one step at a time.

The mock runner (tests/engine/mock_runner.py) computes each step at dispatch and hands its
tokens over at collect; a pending token in a chunk stands for the token it sampled last, as
the device's copy does. Its checks of every chunk against the scheduler's state run in both
modes. The real-model test compares SmolLM2's outputs under the generation defaults (async
scheduling, token buckets 1, 2, 4, 8, 16, ...) with those of one step at a time in the test
engines' buckets (1, 16, 32, ...).
"""

import random

import pytest

from tests.conftest import ENGINE_KWARGS
from tests.engine.mock_runner import mock_engine, reference_output
from tests.engine.test_llm_engine_mock import run
from xlaserve import LLM, SamplingParams
from xlaserve.engine.request import RequestStatus

FINISH = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length"}


def random_requests(seed: int, count: int, long: bool):
    """Mixed stop rules; `long`: longer prompts and outputs (they outgrow a small pool)."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = [rng.randrange(1, 97) for _ in range(rng.randrange(10 if long else 1, 20))]
        max_tokens = rng.choice([20, 30, None] if long else [1, 2, 3, 8, 20, None])
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min(rng.choice([0, 0, 2]), max_tokens or 2),
            ignore_eos=long or rng.random() < 0.3,
            stop_token_ids=rng.sample(range(1, 97), rng.choice([0, 0, 3])),
        )
        requests.append((f"r{i}", prompt, params))
    return requests


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_pages", [64, 16])  # 16 pages of 4 tokens: preemption
def test_async_outputs_equal_the_reference_and_pages_come_back(seed, num_pages):
    engine = mock_engine(num_pages=num_pages, async_scheduling=True)
    assert engine.async_scheduling
    requests = random_requests(seed, 12, long=num_pages == 16)
    for rid, prompt, params in requests:
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    done = run(engine)
    for rid, prompt, params in requests:
        tokens, status, reason = reference_output(
            prompt, params, max_model_len=64, eos_token_ids=(0,)
        )
        out = done[rid].outputs[0]
        assert (out.token_ids, out.finish_reason, out.stop_reason) == (
            tokens, FINISH[status], reason
        ), rid  # fmt: skip
    runner = engine.runner
    assert runner.dispatched_while_in_flight > len(requests)  # the steps really overlapped
    assert engine.get_metrics()["kv_pages_free"] == num_pages and not engine.requests
    if num_pages == 16:
        assert engine.scheduler.num_preemptions > 0


def test_async_and_sync_give_the_same_streams_and_n_samples():
    outputs = {}
    for mode in (False, True):
        engine = mock_engine(async_scheduling=mode)
        engine.add_request("n", {"prompt_token_ids": [5, 7]}, SamplingParams(n=3, max_tokens=6))
        engine.add_request("lp", {"prompt_token_ids": [1, 2, 3]},
                           SamplingParams(max_tokens=4, logprobs=1))  # fmt: skip
        stream = []
        while engine.has_unfinished_requests():
            stream += [(o.request_id, [c.token_ids for c in o.outputs]) for o in engine.step()]
        outputs[mode] = stream
        # Streams never show a pending token.
        assert all(t >= 0 for _, outs in stream for ids in outs for t in ids)
    # The same updates in the same order, async ones one step later.
    assert [s for s in outputs[True] if s[1]] == [s for s in outputs[False] if s[1]]


def test_abort_while_a_step_is_in_flight_frees_pages_and_others_go_on():
    engine = mock_engine(async_scheduling=True)
    engine.add_request("gone", {"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=50))
    engine.add_request("kept", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=6))
    for _ in range(3):
        engine.step()
    assert engine._in_flight is not None
    aborted = engine.abort_request("gone")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert all(t >= 0 for t in aborted.outputs[0].token_ids)
    kept = run(engine)["kept"].outputs[0]
    assert kept.token_ids == reference_output([1, 2, 3], SamplingParams(max_tokens=6),
                                              max_model_len=64, eos_token_ids=(0,))[0]  # fmt: skip
    assert engine.get_metrics()["kv_pages_free"] == 64


def test_a_step_after_an_eos_in_flight_is_dropped():
    # [91, 3, 3] sums to 97 -> token 0 = eos at once; the next step was already dispatched.
    engine = mock_engine(async_scheduling=True)
    engine.add_request("eos", {"prompt_token_ids": [91, 3, 3]}, SamplingParams(max_tokens=5))
    out = run(engine)["eos"].outputs[0]
    assert (out.token_ids, out.finish_reason) == ([0], "stop")
    assert engine.get_metrics()["kv_pages_free"] == 64


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List five fruits:",
    "Q: What is 12 times 12?\nA:",
]


@pytest.mark.slow
def test_smollm2_outputs_are_the_same_with_async_scheduling_off():
    # The defaults: async scheduling and every power-of-two bucket from 1, so small batches run
    # in buckets of 2, 4 and 8 (the shared test engines pad them to 16).
    on_llm = LLM("smollm2-135m-instruct", **{**ENGINE_KWARGS, "token_buckets": None})
    assert on_llm.engine.async_scheduling
    assert on_llm.engine.runner.config.token_buckets == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    params = [
        SamplingParams(temperature=0.0, max_tokens=24, stop=["."]),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20),
        SamplingParams(
            temperature=0.0,
            max_tokens=20,
            repetition_penalty=1.3,
            frequency_penalty=0.5,
            logprobs=2,
        ),  # fmt: skip
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=1.0, seed=3, max_tokens=16, n=2, min_tokens=4),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[28]),
    ]
    on = on_llm.generate(PROMPTS, params, use_tqdm=False)
    off_llm = LLM("smollm2-135m-instruct", async_scheduling=False, **ENGINE_KWARGS)
    assert not off_llm.engine.async_scheduling
    assert off_llm.engine.runner.config.token_buckets == (1, 16, 32, 64, 128, 256)
    off = off_llm.generate(PROMPTS, params, use_tqdm=False)
    for a, b in zip(on, off, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
            if x.logprobs is not None:
                assert [sorted(p) for p in x.logprobs] == [sorted(p) for p in y.logprobs]
    for llm in (on_llm, off_llm):
        m = llm.get_metrics()
        assert m["compiles_after_warmup"] == 0
        assert m["kv_pages_free"] == m["kv_pages_total"]
