"""Jitted sampling: greedy, temperature, top-k/top-p/min-p, penalties, logit bias, seeds, logprobs.

One graph per sequence bucket S. Per-row options arrive as small [S] arrays; vocab-sized
state (prompt-token mask, output-token counts, logit bias) lives on the device in `PenaltyState`
rows, written once when a sequence starts and updated in place by each step's samples, so
penalties never ship vocab-sized arrays per step. Work that no row in the batch needs (penalties,
sorting for top-k/top-p/min-p, random noise, logprobs) is skipped with `lax.cond`.

Randomness: each row's Gumbel noise comes from key(seed) folded with its stream id and its
output-token count, so a seeded request samples the same tokens whatever else is in the batch.
Axis letters: S sequences (rows), V vocab, R penalty-state rows.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from xlaserve.engine.input_batch import GREEDY_EPS, SamplingRows
from xlaserve.engine.input_batch import penalty_row_values as penalty_row_values

MAX_LOGPROBS = 20


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PenaltyState:
    """Per-row vocab-sized state; row R (the last) stays zero for rows without penalties."""

    prompt_mask: jax.Array  # bool[R + 1, V] tokens present in the prompt
    output_counts: jax.Array  # i32[R + 1, V] times each token was generated
    logit_bias: jax.Array  # f32[R + 1, V]

    @staticmethod
    def zeros(num_rows: int, vocab_size: int) -> "PenaltyState":
        shape = (num_rows + 1, vocab_size)
        return PenaltyState(
            jnp.zeros(shape, jnp.bool_), jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32)
        )


# Per-row options [S], packed on the host by the input batch (a NamedTuple: a pytree as is).
SamplingBatch = SamplingRows


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplerOutput:
    tokens: jax.Array  # i32[S]
    token_logprobs: jax.Array  # f32[S] raw-model logprob of the sampled token
    top_ids: jax.Array  # i32[S, MAX_LOGPROBS]
    top_logprobs: jax.Array  # f32[S, MAX_LOGPROBS]


def apply_penalties(logits: jax.Array, b: SamplingBatch, state: PenaltyState) -> jax.Array:
    """OpenAI presence/frequency penalties on output tokens, HF/vLLM repetition penalty on
    prompt and output tokens, then the logit bias."""
    counts = state.output_counts[b.penalty_row]  # [S, V]
    seen = state.prompt_mask[b.penalty_row] | (counts > 0)  # [S, V]
    rep = b.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - b.frequency_penalty[:, None] * counts
    logits = logits - b.presence_penalty[:, None] * (counts > 0)
    return logits + state.logit_bias[b.penalty_row]


def gumbel_noise(b: SamplingBatch, vocab_size: int) -> jax.Array:
    def row_noise(seed, stream, step):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), step)
        return jax.random.gumbel(key, (vocab_size,), jnp.float32)

    return jax.vmap(row_noise)(b.seed, b.stream, b.step)  # [S, V]


def first_argmax(x: jax.Array) -> jax.Array:
    """i32 index of the first maximum along the last axis, as jnp.argmax, computed as a max and
    a min over indices: plain reductions, ~3.5x faster than argmax's variadic reduction on
    XLA's CPU backend (32 x 49152 logits: 1.0 vs 3.6 ms). Clamped into range for NaN rows."""
    size = x.shape[-1]
    is_max = x == jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.minimum(jnp.min(jnp.where(is_max, index, size), axis=-1), size - 1)


def filtered_sample(scaled: jax.Array, noise: jax.Array, b: SamplingBatch) -> jax.Array:
    """Gumbel-max over the tokens that survive top-k, top-p and min-p (in sorted order)."""
    vocab_size = scaled.shape[-1]
    sorted_vals, sorted_ids = jax.lax.top_k(scaled, vocab_size)  # [S, V] descending
    probs = jax.nn.softmax(sorted_vals, axis=-1)
    rank = jnp.arange(vocab_size)[None, :]
    # The top token always survives: its exclusive cumulative mass is 0 and rank 0 < k.
    drop = rank >= b.top_k[:, None]
    drop |= (jnp.cumsum(probs, axis=-1) - probs) > b.top_p[:, None]
    drop |= probs < b.min_p[:, None] * probs[:, :1]
    sorted_noise = jnp.take_along_axis(noise, sorted_ids, axis=-1)
    pick = first_argmax(jnp.where(drop, -jnp.inf, sorted_vals + sorted_noise))  # [S]
    return jnp.take_along_axis(sorted_ids, pick[:, None], axis=-1)[:, 0]


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """-inf where a row's bitmask i32[S, ceil(V/32)] has the token's bit clear (bit t%32 of
    word t//32); rows with every bit set are unchanged."""
    num_rows, vocab_size = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [S, W, 32]
    allowed = bits.reshape(num_rows, -1)[:, :vocab_size] != 0  # [S, V]
    return jnp.where(allowed, logits, -jnp.inf)


def sample(
    logits: jax.Array, b: SamplingBatch, state: PenaltyState
) -> tuple[SamplerOutput, PenaltyState]:
    """logits f32[S, V] -> sampled tokens (and logprobs), and the penalty state after them."""
    num_rows, vocab_size = logits.shape
    processed = jax.lax.cond(
        b.use_penalties, lambda: apply_penalties(logits, b, state), lambda: logits
    )
    if b.token_bitmask is not None:  # structured outputs: disallowed tokens can't be drawn
        processed = jax.lax.cond(
            b.use_bitmask,
            lambda: apply_token_bitmask(processed, b.token_bitmask),
            lambda: processed,
        )
    greedy = first_argmax(processed)  # [S]

    def random_tokens():
        scaled = processed / jnp.maximum(b.temperature, GREEDY_EPS)[:, None]
        noise = gumbel_noise(b, vocab_size)
        return jax.lax.cond(
            b.use_filters,
            lambda: filtered_sample(scaled, noise, b),
            lambda: first_argmax(scaled + noise),
        ).astype(jnp.int32)

    sampled = jax.lax.cond(b.use_random, random_tokens, lambda: greedy)
    tokens = jnp.where(b.temperature < GREEDY_EPS, greedy, sampled)  # [S]

    def logprobs():
        # Logprobs of the raw model distribution (before penalties and temperature).
        lp = jax.nn.log_softmax(logits, axis=-1)
        top_lp, top_ids = top_logprobs(lp)
        return jnp.take_along_axis(lp, tokens[:, None], -1)[:, 0], top_ids, top_lp

    def no_logprobs():
        zeros = jnp.zeros((num_rows, MAX_LOGPROBS))
        return jnp.zeros((num_rows,)), zeros.astype(jnp.int32), zeros

    token_lp, top_ids, top_lp = jax.lax.cond(b.use_logprobs, logprobs, no_logprobs)
    # Count this step's samples for rows with penalty state (row R is dropped: out of range).
    num_state_rows = state.output_counts.shape[0] - 1
    write_rows = jnp.where(b.penalty_row < num_state_rows, b.penalty_row, num_state_rows + 1)
    counts = state.output_counts.at[write_rows, tokens].add(1, mode="drop")
    new_state = PenaltyState(state.prompt_mask, counts, state.logit_bias)
    return SamplerOutput(tokens, token_lp, top_ids, top_lp), new_state


def top_logprobs(lp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Best MAX_LOGPROBS (logprob, id) per row; a vocabulary smaller than that is padded
    with logprob -inf."""
    k = min(MAX_LOGPROBS, lp.shape[-1])
    top_lp, top_ids = jax.lax.top_k(lp, k)
    pad = ((0, 0), (0, MAX_LOGPROBS - k))
    return jnp.pad(top_lp, pad, constant_values=-jnp.inf), jnp.pad(top_ids, pad)


def init_penalty_row(
    state: PenaltyState,
    row: jax.Array,
    prompt_mask: jax.Array,
    output_counts: jax.Array,
    logit_bias: jax.Array,
) -> PenaltyState:
    """Writes one sequence's row (once, when it starts or resumes after preemption)."""
    return PenaltyState(
        state.prompt_mask.at[row].set(prompt_mask),
        state.output_counts.at[row].set(output_counts),
        state.logit_bias.at[row].set(logit_bias),
    )
