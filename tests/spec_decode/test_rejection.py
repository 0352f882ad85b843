"""The on-device verification rule: greedy keeps the argmax path; sampling keeps the target
distribution exactly (chi-square), and a wrong acceptance rule fails the same check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.engine import sampler
from xlaserve.engine.input_batch import default_sampling_rows
from xlaserve.spec_decode import rejection

V = 8
# Chi-square critical value for 7 degrees of freedom at p = 0.001.
CHI2_CRIT_7DF = 24.32


def rows(num, *, temperature=1.0, seed=0, **overrides):
    f = default_sampling_rows(num, vocab_size=V, none_row=num, seed=seed)
    f["temperature"][:] = temperature
    f["stream"][:] = np.arange(num)
    f["use_random"] = np.bool_(temperature > 0)
    for key, value in overrides.items():
        f[key] = value
    return sampler.SamplingRows(**f)


def chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_accepts_the_argmax_prefix_and_emits_the_correction():
    logits = np.full((2, 4, V), -5.0, np.float32)
    path = [[3, 1, 4, 1], [2, 7, 1, 0]]  # the target's argmax at each position
    for r, ids in enumerate(path):
        logits[r, np.arange(4), ids] = 5.0
    drafts = np.array([[3, 1, 6], [2, 7, 1]], np.int32)  # row 0 breaks at 2; row 1 all match
    state = sampler.PenaltyState.zeros(2, V)
    out, _ = rejection.verify(jnp.asarray(logits), rows(2, temperature=0.0), state,
                              jnp.asarray(drafts), jnp.asarray([3, 3], np.int32))  # fmt: skip
    assert out.num_tokens.tolist() == [3, 4]
    assert out.tokens.tolist() == [[3, 1, 4, -1], [2, 7, 1, 0]]


def test_row_without_drafts_draws_what_the_plain_sampler_draws():
    logits = jax.random.normal(jax.random.key(1), (64, 3, V))
    b = rows(64, seed=7)
    state = sampler.PenaltyState.zeros(64, V)
    out, _ = rejection.verify(logits, b, state, jnp.zeros((64, 2), jnp.int32),
                              jnp.zeros(64, jnp.int32))  # fmt: skip
    plain, _ = sampler.sample(logits[:, 0], b, state)
    assert out.num_tokens.tolist() == [1] * 64
    assert out.tokens[:, 0].tolist() == plain.tokens.tolist()


def sampled_first_tokens(p_logits, q, k, num, *, always_accept=False, monkeypatch=None):
    """The first emitted token of `num` independent rows whose drafts are drawn from q."""
    rng = np.random.default_rng(0)
    drafts = np.stack([rng.choice(V, size=num, p=q[j]) for j in range(k)], axis=1)
    logits = jnp.broadcast_to(jnp.asarray(p_logits), (num, k + 1, V))
    q_dense = jnp.broadcast_to(jnp.asarray(q[:k]), (num, k, V))
    if always_accept:  # the wrong rule: every draft accepted
        monkeypatch.setattr(rejection, "acceptance_uniforms",
                            lambda b, k: jnp.zeros((num, k)))  # fmt: skip
    out, _ = rejection.verify(logits, rows(num, seed=3), sampler.PenaltyState.zeros(num, V),
                              jnp.asarray(drafts, jnp.int32), jnp.full(num, k, jnp.int32),
                              q_dense)  # fmt: skip
    return np.asarray(out.tokens), np.asarray(out.num_tokens)


@pytest.fixture
def distributions():
    rng = np.random.default_rng(42)
    p_logits = rng.normal(size=(3, V)).astype(np.float32) * 1.5
    q = rng.dirichlet(np.ones(V), size=3).astype(np.float32)
    p = np.exp(p_logits) / np.exp(p_logits).sum(-1, keepdims=True)
    return p_logits, q, p


def test_sampled_tokens_follow_the_target_distribution(distributions):
    p_logits, q, p = distributions
    tokens, num = sampled_first_tokens(p_logits, q, 2, 40000)
    first = np.bincount(tokens[:, 0], minlength=V)
    assert chi_square(first, p[0]) < CHI2_CRIT_7DF
    # The second token, among rows that accepted the first draft, follows p at position 1.
    second = np.bincount(tokens[num >= 2, 1], minlength=V)
    assert chi_square(second, p[1]) < CHI2_CRIT_7DF
    # Acceptance of the first draft is sum_x min(p, q), as the rule says.
    assert abs((num >= 2).mean() - np.minimum(p[0], q[0]).sum()) < 0.01


def test_a_wrong_acceptance_rule_fails_the_same_check(distributions, monkeypatch):
    p_logits, q, p = distributions
    tokens, _ = sampled_first_tokens(p_logits, q, 2, 40000, always_accept=True,
                                     monkeypatch=monkeypatch)  # fmt: skip
    assert chi_square(np.bincount(tokens[:, 0], minlength=V), p[0]) > CHI2_CRIT_7DF


def test_one_hot_drafts_with_top_k_and_penalties_keep_the_filtered_target():
    """n-gram style (one-hot q) under top-k 3 and a presence penalty that counts the draft."""
    num = 40000
    rng = np.random.default_rng(5)
    p_logits = rng.normal(size=(2, V)).astype(np.float32)
    drafts = np.full((num, 1), int(np.argmax(p_logits[0])), np.int32)
    b = rows(num, seed=11, top_k=np.full(num, 3, np.int32), use_filters=np.bool_(True),
             presence_penalty=np.full(num, 1.0, np.float32), use_penalties=np.bool_(True),
             penalty_row=np.zeros(num, np.int32))  # fmt: skip
    state = sampler.PenaltyState.zeros(1, V)
    logits = jnp.broadcast_to(jnp.asarray(p_logits), (num, 2, V))
    out, new_state = rejection.verify(logits, b, state, jnp.asarray(drafts),
                                      jnp.ones(num, jnp.int32))  # fmt: skip
    tokens, n = np.asarray(out.tokens), np.asarray(out.num_tokens)

    def filtered(x):
        keep = np.argsort(-x)[:3]
        e = np.zeros(V)
        e[keep] = np.exp(x[keep] - x[keep].max())
        return e / e.sum()

    p0 = filtered(p_logits[0])
    assert chi_square(np.bincount(tokens[:, 0], minlength=V)[p0 > 0], p0[p0 > 0]) < 13.82
    # Position 1 sees the accepted draft as an output: the presence penalty applies to it.
    penalized = p_logits[1].copy()
    penalized[drafts[0, 0]] -= 1.0
    p1 = filtered(penalized)
    second = np.bincount(tokens[n == 2, 1], minlength=V)
    assert chi_square(second[p1 > 0], p1[p1 > 0]) < 13.82  # 2 degrees of freedom, p = 0.001
    # Every emitted token was counted into the (shared, here) penalty row.
    assert int(new_state.output_counts[0].sum()) == int(n.sum())
