"""SamplingParams: normalization, and one ValueError per bad value naming field and value."""

import math

import numpy as np
import pytest

from xlaserve.engine.sampling_params import SamplingParams


def test_defaults_and_normalization():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.max_tokens) == (1, 1.0, 0, 1.0, 16)
    assert (p.stop, p.stop_token_ids, p.logit_bias) == ([], [], {})
    assert not p.greedy
    p = SamplingParams(stop="###", top_k=-1, temperature=1, seed=np.int64(3), logit_bias={5: 1})
    assert p.stop == ["###"] and p.top_k == 0
    assert type(p.temperature) is float and type(p.seed) is int and p.logit_bias == {5: 1.0}
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(1, 2)).stop_token_ids == [1, 2]
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.5, top_k=2).greedy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be >= 1, got 0"),
        ({"n": 2.0}, "n must be an int, got 2.0"),
        ({"n": True}, "n must be an int, got True"),
        ({"temperature": math.nan}, "temperature must be >= 0 and finite, got nan"),
        ({"temperature": math.inf}, "temperature must be >= 0 and finite, got inf"),
        ({"temperature": -0.1}, "temperature must be >= 0 and finite, got -0.1"),
        ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
        ({"temperature": True}, "temperature must be a number, got True"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": math.nan}, "top_p must be finite, got nan"),
        ({"top_k": -2}, "top_k must be -1 or 0 (off) or >= 1, got -2"),
        ({"top_k": 1.5}, "top_k must be an int, got 1.5"),
        ({"min_p": -0.5}, "min_p must be in [0, 1], got -0.5"),
        ({"min_p": 1.01}, "min_p must be in [0, 1], got 1.01"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"presence_penalty": -math.inf}, "presence_penalty must be finite, got -inf"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3.0"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0, got 0.0"),
        ({"repetition_penalty": math.nan}, "repetition_penalty must be finite, got nan"),
        ({"seed": 1.0}, "seed must be an int or None, got 1.0"),
        ({"seed": "42"}, "seed must be an int or None, got '42'"),
        ({"stop": ""}, "stop strings must be non-empty, got ''"),
        ({"stop": ["a", ""]}, "stop strings must be non-empty, got ''"),
        ({"stop": [1]}, "stop must contain only strings, got 1"),
        ({"stop": 5}, "stop must be a string, a list of strings or None, got 5"),
        ({"stop_token_ids": [-1]}, "stop_token_ids entry must be >= 0, got -1"),
        ({"stop_token_ids": ["1"]}, "stop_token_ids entry must be an int, got '1'"),
        ({"stop_token_ids": 3}, "stop_token_ids must be a list of ints or None, got 3"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool, got 1"),
        ({"detokenize": "yes"}, "detokenize must be a bool, got 'yes'"),
        ({"include_stop_str_in_output": None}, "include_stop_str_in_output must be a bool"),
        ({"skip_special_tokens": 0}, "skip_special_tokens must be a bool, got 0"),
        ({"max_tokens": 0}, "max_tokens must be >= 1 or None, got 0"),
        ({"max_tokens": 1.5}, "max_tokens must be an int or None, got 1.5"),
        ({"min_tokens": -1}, "min_tokens must be >= 0, got -1"),
        ({"min_tokens": 17}, "min_tokens must be <= max_tokens (16), got 17"),
        ({"logprobs": 21}, "logprobs must be in [0, 20], got 21"),
        ({"logprobs": -1}, "logprobs must be in [0, 20], got -1"),
        ({"prompt_logprobs": 21}, "prompt_logprobs must be in [0, 20], got 21"),
        ({"prompt_logprobs": 2.0}, "prompt_logprobs must be an int or None, got 2.0"),
        ({"logit_bias": [1]}, "logit_bias must be a dict of token id -> float, got [1]"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias key must be an int, got '5'"),
        ({"logit_bias": {-5: 1.0}}, "logit_bias key must be >= 0, got -5"),
        ({"logit_bias": {5: math.nan}}, "logit_bias[5] must be finite, got nan"),
        ({"logit_bias": {5: 101}}, "logit_bias[5] must be in [-100.0, 100.0], got 101.0"),
    ],
)
def test_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**kwargs)
    assert message in str(excinfo.value)


def test_boundaries_are_accepted():
    # Every value sits on the edge of its range; each is kept as given (as a plain number).
    p = SamplingParams(
        temperature=0, top_p=1, top_k=1, min_p=1, presence_penalty=-2, frequency_penalty=2,
        repetition_penalty=1e-3, logprobs=20, prompt_logprobs=0, min_tokens=16,
        logit_bias={0: -100, 1: 100}, seed=-1,
    )  # fmt: skip
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.0, 1.0, 1, 1.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (-2.0, 2.0, 1e-3)
    assert (p.logprobs, p.prompt_logprobs, p.seed) == (20, 0, -1)
    assert (p.min_tokens, p.max_tokens) == (16, 16)
    assert p.logit_bias == {0: -100.0, 1: 100.0}
    assert type(p.top_p) is float and type(p.presence_penalty) is float and p.greedy
    p = SamplingParams(logprobs=0, prompt_logprobs=20, max_tokens=1, min_tokens=1)
    assert (p.logprobs, p.prompt_logprobs, p.max_tokens, p.min_tokens) == (0, 20, 1, 1)


def test_validate_for_model():
    SamplingParams(stop_token_ids=[0, 99], logit_bias={99: 1}).validate_for_model(100)
    with pytest.raises(ValueError, match=r"stop_token_ids entry must be in \[0, 100\).*got 100"):
        SamplingParams(stop_token_ids=[100]).validate_for_model(100)
    with pytest.raises(ValueError, match=r"logit_bias key must be in \[0, 100\).*got 150"):
        SamplingParams(logit_bias={150: 1.0}).validate_for_model(100)
    with pytest.raises(ValueError, match="vocab_size must be >= 1, got 0"):
        SamplingParams().validate_for_model(0)
