"""The n-gram proposer, the adaptive policy and the config's checks (device-free)."""

import numpy as np
import pytest

from xlaserve.spec_decode.config import SpeculativeConfig
from xlaserve.spec_decode.ngram import SEARCH_WINDOW, propose_ngram
from xlaserve.spec_decode.policy import SpecDecodePolicy, expected_tokens


def naive_ngram(tokens, k, min_n, max_n):
    """The rule written plainly: longest suffix with an earlier occurrence, most recent one,
    continuation extended with its own drafts."""
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                ext = list(tokens)
                for j in range(k):
                    ext.append(ext[start + n + j])
                return ext[len(tokens) :]
    return []


def test_batched_ngram_equals_the_plain_rule_on_random_contexts():
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, 5, size=rng.integers(1, 60)).tolist() for _ in range(300)]
    got = propose_ngram(contexts, 4, 1, 4)
    assert got == [naive_ngram(c, 4, 1, 4) for c in contexts]
    assert sum(1 for d in got if d) > 250  # a 5-token alphabet matches almost always


def test_ngram_limits_window_and_no_match():
    assert propose_ngram([[1, 2, 3, 1, 2]], 3, 2, 2) == [[3, 1, 2]]
    assert propose_ngram([[1, 2, 3, 1, 2]], 3, 2, 2, limits=[1]) == [[3]]
    assert propose_ngram([[1, 2, 3, 4]], 3, 1, 3) == [[]]
    assert propose_ngram([], 3, 1, 3) == []
    long = [7, 8] + [1, 2, 3] * (SEARCH_WINDOW // 3 + 10)
    assert propose_ngram([long], 2, 3, 3) == [[1, 2]]


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 4) == pytest.approx(5.0, rel=0.01)


def make_policy(**kw):
    return SpecDecodePolicy(SpeculativeConfig(method="ngram", num_speculative_tokens=4, **kw))


def test_a_request_backs_off_when_its_drafts_fail_and_comes_back():
    policy = make_policy(backoff_acceptance=0.3, max_backoff_steps=8)
    policy.begin_step(1)
    assert policy.wants_drafts(0)
    for _ in range(2):
        policy.observe(0, 4, 0)
    paused = []
    for _ in range(10):
        policy.begin_step(1)
        paused.append(not policy.wants_drafts(0))
    assert paused[:5] == [True] * 4 + [False]  # 4 steps off, then measured anew
    assert policy.wants_drafts(1)  # others are unaffected
    # Failing again doubles the pause.
    for _ in range(2):
        policy.observe(0, 4, 0)
    off = 0
    for _ in range(20):
        policy.begin_step(1)
        off += not policy.wants_drafts(0)
    assert off == 8
    stats = policy.stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (4, 16, 0)


def test_the_engine_stops_drafting_when_verification_costs_more_than_it_saves():
    from xlaserve.engine.runner_api import StepCosts

    policy = make_policy()
    # Measured: a forward's cost flat up to 64 tokens, then linear (compute bound); verifying
    # costs a little more than sampling.
    policy.update_costs(StepCosts(
        forward={16: 0.010, 32: 0.010, 64: 0.011, 128: 0.020, 256: 0.040, 512: 0.080},
        sample={8: 0.0005, 64: 0.002}, verify={8: 0.001, 64: 0.008}))  # fmt: skip
    for _ in range(5):
        policy.observe(0, 4, 2)  # acceptance 0.5: 1.94 tokens per verification
    # 8 sequences: 3 drafts each (32 tokens) still cost what 8 tokens cost; a 4th spills into
    # the 64-token step for less than it brings.
    policy.begin_step(8)
    assert policy.batch_enabled and policy.wants_drafts(5) and policy.draft_limit == 3
    policy.begin_step(64)  # 320 tokens -> 0.080 s for 124 tokens vs 0.020 s for 64: it does not
    assert not policy.batch_enabled and not policy.wants_drafts(5)
    assert policy.stats.disabled_steps == 1
    capped = make_policy(disable_by_batch_size=4)
    capped.begin_step(4)
    assert not capped.batch_enabled


@pytest.mark.parametrize(
    "value, message",
    [
        ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": -1}, "num_speculative_tokens"),
        ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
        (
            {
                "method": "ngram",
                "num_speculative_tokens": 2,
                "prompt_lookup_min": 5,
                "prompt_lookup_max": 2,
            },
            "prompt_lookup_min",
        ),  # fmt: skip
        ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "unknown keys"),
        ("{not json", "not valid JSON"),
        ([1, 2], "must be a dict"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(value, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_value(value)


def test_engine_args_and_cli_take_json():
    import argparse

    from xlaserve.cli_args import add_engine_args, engine_args_from

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    ns = parser.parse_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
    )
    args = engine_args_from(ns)
    assert args.speculative_config == SpeculativeConfig("ngram", 3)
