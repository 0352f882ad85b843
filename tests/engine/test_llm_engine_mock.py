"""LLMEngine's request lifecycle over the hand-checkable mock runner (no device)."""

import pytest

from tests.engine.mock_runner import mock_engine
from xlaserve.engine.sampling_params import SamplingParams


def run(engine):
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def test_tokens_follow_the_mock_rule():
    # [1, 2, 3] -> 6, 12, 24, 48 (sum of everything so far, mod 97).
    engine = mock_engine()
    rid = engine.add_request("a", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4))
    out = run(engine)[rid]
    assert out.outputs[0].token_ids == [6, 12, 24, 48]
    assert (out.outputs[0].finish_reason, out.outputs[0].text) == ("length", "")
    assert engine.get_metrics()["kv_pages_free"] == 64


def test_logprobs_and_abort_free_pages():
    engine = mock_engine()
    engine.add_request("lp", {"prompt_token_ids": [1, 2, 3]},
                       SamplingParams(max_tokens=2, logprobs=1))  # fmt: skip
    engine.add_request("gone", {"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=50))
    engine.step()
    aborted = engine.abort_request("gone")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    out = run(engine)["lp"].outputs[0]
    assert [p[t].logprob for p, t in zip(out.logprobs, out.token_ids, strict=True)] == [-0.6, -0.2]
    assert out.cumulative_logprob == pytest.approx(-0.8)
    assert engine.get_metrics()["kv_pages_free"] == 64 and not engine.requests


def test_eos_stops_unless_ignored():
    # [97 - 6, 3, 3] sums to 97 -> token 0 = eos.
    engine = mock_engine()
    engine.add_request("eos", {"prompt_token_ids": [91, 3, 3]}, SamplingParams(max_tokens=5))
    engine.add_request("ign", {"prompt_token_ids": [91, 3, 3]},
                       SamplingParams(max_tokens=3, ignore_eos=True))  # fmt: skip
    done = run(engine)
    assert done["eos"].outputs[0].token_ids == [0]
    assert done["eos"].outputs[0].finish_reason == "stop"
    assert done["ign"].outputs[0].token_ids == [0, 0, 0]


def test_bad_requests_leave_the_engine_serving():
    engine = mock_engine()
    for prompt in ({"prompt_token_ids": []}, {"prompt_token_ids": [97]}, {"x": 1}, 5):
        with pytest.raises(ValueError):
            engine.add_request(None, prompt)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(None, {"prompt_token_ids": [1] * 64})
    with pytest.raises(ValueError, match="stop strings need"):
        engine.add_request(None, {"prompt_token_ids": [1]}, SamplingParams(stop=["x"]))
    engine.add_request("ok", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=1))
    assert run(engine)["ok"].outputs[0].token_ids == [6]
