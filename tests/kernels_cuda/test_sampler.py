"""The torch sampler on hand-made logits, and against the JAX sampler where both are exact."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from xlaserve.engine import sampler as jax_sampler
from xlaserve.kernels_cuda import sampler

V = 6


def batch(rows: int, **kw) -> sampler.SamplingBatch:
    """Greedy rows with no filters or penalties unless `kw` says otherwise (lists per row)."""

    def f32(name, default):
        return torch.tensor(kw.get(name, [default] * rows), dtype=torch.float32)

    return sampler.SamplingBatch(
        temperature=f32("temperature", 0.0),
        top_k=torch.tensor(kw.get("top_k", [V] * rows)),
        top_p=f32("top_p", 1.0),
        min_p=f32("min_p", 0.0),
        presence_penalty=f32("presence_penalty", 0.0),
        frequency_penalty=f32("frequency_penalty", 0.0),
        repetition_penalty=f32("repetition_penalty", 1.0),
        penalties=kw.get("penalties", [None] * rows),
        streams=kw.get("streams", [(0, i, 0) for i in range(rows)]),
        want_logprobs=kw.get("want_logprobs", False),
    )


def penalty_row(prompt=(), outputs=(), bias=None) -> sampler.PenaltyRow:
    mask, counts, bias = jax_sampler.penalty_row_values(list(prompt), list(outputs), bias, V)
    return sampler.PenaltyRow(
        *(torch.from_numpy(x) for x in (mask, counts.astype(np.float32), bias))
    )


LOGITS = torch.tensor([[1.0, 3.0, 3.0, -2.0, 0.5, 2.5]])


def test_greedy_takes_the_first_of_tied_maxima():
    assert sampler.sample(LOGITS, batch(1)).tokens.tolist() == [1]


def test_penalties_and_bias_by_hand():
    # Token 1 in the prompt, repetition 2: 3 -> 1.5. Token 2 generated twice, frequency 0.5 and
    # presence 0.25: 3 -> 3 / 2 (also seen) - 1 - 0.25 = 0.25. Token 5 biased +1: 2.5 -> 3.5.
    row = penalty_row(prompt=[1], outputs=[2, 2], bias={5: 1.0})
    b = batch(1, repetition_penalty=[2.0], frequency_penalty=[0.5], presence_penalty=[0.25],
              penalties=[row])  # fmt: skip
    processed = sampler.apply_penalties(LOGITS, b)
    torch.testing.assert_close(processed, torch.tensor([[1.0, 1.5, 0.25, -2.0, 0.5, 3.5]]))
    assert sampler.sample(LOGITS, b).tokens.tolist() == [5]


def test_top_k_one_and_a_tight_min_p_are_greedy_at_any_temperature():
    # At temperature 5 token 2 keeps 98% of token 1's probability: min_p 0.99 still drops it.
    logits = torch.tensor([[0.0, 4.0, 3.9, 1.0, 0.0, 0.0]]).repeat(2, 1)
    for step in range(20):  # different noise every step, same winner
        b = batch(2, temperature=[5.0, 5.0], top_k=[1, V], min_p=[0.0, 0.99],
                  streams=[(s, 0, step) for s in (1, 2)])  # fmt: skip
        assert sampler.sample(logits, b).tokens.tolist() == [1, 1]


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    alone = batch(1, temperature=[1.0], streams=[(1234, 0, 7)])
    mixed = batch(4, temperature=[0.0, 1.3, 1.0, 0.7], top_p=[1.0, 0.8, 1.0, 1.0],
                  streams=[(9, 1, 0), (5, 2, 3), (1234, 0, 7), (1, 0, 0)])  # fmt: skip
    draws = {sampler.sample(logits[2:3], alone).tokens.item() for _ in range(3)}
    assert len(draws) == 1
    assert sampler.sample(logits, mixed).tokens[2].item() == draws.pop()
    # Different steps draw different noise (most of 30 steps must not all agree).
    picks = {sampler.gumbel_noise([(1234, 0, s)], [0], V).argmax().item() for s in range(30)}
    assert len(picks) > 1


def test_small_vocab_top_logprobs_are_padded_with_minus_inf():
    out = sampler.sample(LOGITS, batch(1, want_logprobs=True))
    assert out.top_logprobs.shape == (1, jax_sampler.MAX_LOGPROBS)
    assert torch.isinf(out.top_logprobs[0, V:]).all()
    torch.testing.assert_close(out.token_logprobs, torch.log_softmax(LOGITS, -1)[:, 1])


def test_greedy_penalties_and_logprobs_match_the_jax_sampler():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, V)).astype(np.float32) * 3
    rows = [([0, 1], [2], {3: 2.0}), ([4], [4, 4, 5], None)]
    kw = dict(repetition_penalty=[1.5, 1.2, 1.0], presence_penalty=[0.5, 0.0, 0.0],
              frequency_penalty=[0.0, 0.7, 0.0])  # fmt: skip
    ours = sampler.sample(
        torch.from_numpy(logits),
        batch(3, penalties=[penalty_row(*r) for r in rows] + [None], want_logprobs=True, **kw),
    )
    state = jax_sampler.PenaltyState.zeros(2, V)
    for i, r in enumerate(rows):
        state = jax_sampler.init_penalty_row(
            state, i, *jax_sampler.penalty_row_values(list(r[0]), list(r[1]), r[2], V)
        )
    f32 = lambda name, d: jnp.asarray(kw.get(name, [d] * 3), jnp.float32)  # noqa: E731
    jb = jax_sampler.SamplingBatch(
        temperature=jnp.zeros(3), top_k=jnp.full(3, V), top_p=jnp.ones(3), min_p=jnp.zeros(3),
        presence_penalty=f32("presence_penalty", 0), frequency_penalty=f32("frequency_penalty", 0),
        repetition_penalty=f32("repetition_penalty", 1), penalty_row=jnp.asarray([0, 1, 2]),
        seed=jnp.zeros(3, jnp.uint32), stream=jnp.zeros(3, jnp.int32), step=jnp.zeros(3, jnp.int32),
        use_penalties=jnp.bool_(True), use_filters=jnp.bool_(False), use_random=jnp.bool_(False),
        use_logprobs=jnp.bool_(True),
    )  # fmt: skip
    theirs, _ = jax_sampler.sample(jnp.asarray(logits), jb, state)
    assert ours.tokens.tolist() == np.asarray(theirs.tokens).tolist()
    np.testing.assert_allclose(ours.token_logprobs.numpy(), theirs.token_logprobs, atol=1e-6)
    np.testing.assert_array_equal(ours.top_ids[:, :V].numpy(), np.asarray(theirs.top_ids)[:, :V])


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_stream_seeds_fit_a_torch_generator(seed):
    # Extreme request seeds, streams and steps give a seed in [0, 2**63) that a generator keeps
    # exactly (no wrap-around that could merge two streams), the same one every time.
    for stream, step in ((0, 0), (2**31 - 1, 10**6), (-1, 0)):
        value = sampler.stream_seed(seed, stream, step)
        assert 0 <= value < 2**63
        assert torch.Generator().manual_seed(value).initial_seed() == value
        assert sampler.stream_seed(seed, stream, step) == value
    # Neighbouring triples get different seeds.
    triples = [(seed, 0, 0), (seed, 1, 0), (seed, 0, 1), (seed ^ 1, 0, 0), (seed, 2**31 - 1, 10**6)]
    assert len({sampler.stream_seed(*t) for t in triples}) == len(triples)
