"""The jitted sampler on hand-made logits: each option does what it says, seeds are per row."""

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.engine import sampler

V = 8
sample = jax.jit(sampler.sample)


def batch(rows: int, **overrides) -> sampler.SamplingBatch:
    fields = dict(
        temperature=np.ones(rows, np.float32),
        top_k=np.full(rows, V, np.int32),
        top_p=np.ones(rows, np.float32),
        min_p=np.zeros(rows, np.float32),
        presence_penalty=np.zeros(rows, np.float32),
        frequency_penalty=np.zeros(rows, np.float32),
        repetition_penalty=np.ones(rows, np.float32),
        penalty_row=np.full(rows, 4, np.int32),  # 4 = no row (state has rows 0..3 + null)
        seed=np.zeros(rows, np.uint32),
        stream=np.arange(rows, dtype=np.int32),
        step=np.zeros(rows, np.int32),
    )
    fields.update({k: np.asarray(v, fields[k].dtype) for k, v in overrides.items()})
    temp, k = fields["temperature"], fields["top_k"]
    filters = (k < V) | (fields["top_p"] < 1) | (fields["min_p"] > 0)
    return sampler.SamplingBatch(
        **fields,
        use_penalties=np.bool_((fields["penalty_row"] < 4).any()),
        use_filters=np.bool_(((temp > 0) & filters).any()),
        use_random=np.bool_((temp > 0).any()),
        use_logprobs=np.bool_(True),
    )


def state():
    return sampler.PenaltyState.zeros(4, V)


# Probabilities 0.4, 0.3, 0.2, 0.1 on tokens 0..3; the rest ~0.
LOGITS = np.log(np.array([0.4, 0.3, 0.2, 0.1, 1e-9, 1e-9, 1e-9, 1e-9], np.float32))


def test_greedy_top_k_1_tiny_top_p_and_min_p_1_all_pick_the_argmax():
    logits = np.stack([LOGITS[[1, 0, 2, 3, 4, 5, 6, 7]]] * 4)  # argmax is token 1
    b = batch(4, temperature=[0.0, 1.0, 1.0, 1.0], top_k=[V, 1, V, V], top_p=[1, 1, 1e-6, 1],
              min_p=[0, 0, 0, 1.0])  # fmt: skip
    out, _ = sample(logits, b, state())
    assert out.tokens.tolist() == [1, 1, 1, 1]


def test_logprobs_are_the_raw_log_softmax():
    out, _ = sample(np.stack([LOGITS]), batch(1, temperature=[0.0]), state())
    np.testing.assert_allclose(out.token_logprobs, [np.log(0.4)], atol=1e-5)
    assert out.top_ids[0, :4].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(out.top_logprobs[0, :4], np.log([0.4, 0.3, 0.2, 0.1]), atol=1e-5)


def test_sampling_frequencies_follow_the_distribution_and_filters():
    n = 4000
    logits = np.tile(LOGITS, (n, 1))
    # One row per step value: different keys, same seed.
    plain, _ = sample(logits, batch(n, step=np.arange(n), stream=np.zeros(n)), state())
    freq = np.bincount(np.asarray(plain.tokens), minlength=V) / n
    np.testing.assert_allclose(freq[:4], [0.4, 0.3, 0.2, 0.1], atol=0.03)
    top2, _ = sample(logits, batch(n, step=np.arange(n), stream=np.zeros(n), top_k=np.full(n, 2)),
                     state())  # fmt: skip
    freq = np.bincount(np.asarray(top2.tokens), minlength=V) / n
    np.testing.assert_allclose(freq[:2], [0.4 / 0.7, 0.3 / 0.7], atol=0.03)
    assert freq[2:].sum() == 0
    # top_p 0.6: tokens 0 and 1 (cumulative 0.4 < 0.6 before token 1; 0.7 before token 2).
    nucleus, _ = sample(logits, batch(n, step=np.arange(n), stream=np.zeros(n),
                                      top_p=np.full(n, 0.6)), state())  # fmt: skip
    assert set(np.asarray(nucleus.tokens).tolist()) == {0, 1}
    # min_p 0.45: tokens with p >= 0.18 survive (0, 1, 2).
    minp, _ = sample(logits, batch(n, step=np.arange(n), stream=np.zeros(n),
                                   min_p=np.full(n, 0.45)), state())  # fmt: skip
    assert set(np.asarray(minp.tokens).tolist()) == {0, 1, 2}


def test_a_row_samples_the_same_whatever_the_batch_around_it():
    seeded = dict(seed=[77], stream=[0], step=[5], temperature=[1.0])
    alone, _ = sample(np.stack([LOGITS]), batch(1, **seeded), state())
    rows = 6
    b = batch(rows, seed=[1, 2, 77, 3, 4, 5], stream=[9, 9, 0, 9, 9, 9], step=[0, 1, 5, 2, 3, 4],
              temperature=[1, 0, 1, 2, 1, 1], top_k=[2, V, V, V, 3, V])  # fmt: skip
    busy, _ = sample(np.tile(LOGITS, (rows, 1)), b, state())
    assert busy.tokens[2] == alone.tokens[0]


def test_penalties_and_bias_use_the_device_rows_and_counts_grow():
    st = state()
    mask, counts, bias = sampler.penalty_row_values([0], [1, 1], {3: 100.0}, V)
    st = sampler.init_penalty_row(st, 0, mask, counts, bias)
    assert st.output_counts[0, 1] == 2 and st.prompt_mask[0, 0]
    # Row 0 has the bias: token 3 wins. Count of token 3 in row 0 rises to 1.
    out, st = sample(np.stack([LOGITS]), batch(1, temperature=[0.0], penalty_row=[0]), st)
    assert out.tokens.tolist() == [3] and int(st.output_counts[0, 3]) == 1
    # Repetition penalty (no bias): token 0 (in the prompt) 0.4 -> logit*4 falls below token 1
    # (seen, count 2, also penalized), so token 2 wins: log 0.2 > 4 * log 0.3.
    st2 = sampler.init_penalty_row(state(), 1, mask, counts, np.zeros(V, np.float32))
    out, _ = sample(
        np.stack([LOGITS]), batch(1, temperature=[0.0], penalty_row=[1],
                                  repetition_penalty=[4.0]), st2)  # fmt: skip
    assert out.tokens.tolist() == [2]
    # Frequency penalty 1 on token 1 (count 2): log 0.3 - 2 < log 0.2; presence on 0 unused.
    swapped = np.stack([LOGITS[[1, 0, 2, 3, 4, 5, 6, 7]]])
    b = batch(1, temperature=[0.0], penalty_row=[1], frequency_penalty=[1.0])
    out, _ = sample(swapped, b, st2)
    assert out.tokens.tolist() == [0]


def test_rows_without_penalties_ignore_the_state():
    st = sampler.init_penalty_row(state(), 0, *sampler.penalty_row_values([], [], {5: 50.0}, V))
    out, st = sample(np.stack([LOGITS]), batch(1, temperature=[0.0]), st)
    assert out.tokens.tolist() == [0]
    assert int(jnp.sum(st.output_counts)) == 0


def test_first_argmax_matches_argmax_including_ties_and_masked_rows():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (64, 1000)).astype(np.float32)  # many ties: first index must win
    x[5] = -np.inf  # a fully masked row picks index 0, like argmax
    x[6, :10] = np.inf
    got = np.asarray(sampler.first_argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32
