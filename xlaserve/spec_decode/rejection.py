"""Verification of drafted tokens on the device, for every row of the batch at once.

Each row carries up to K drafts d_0..d_{n-1} and the target's logits at Q = K + 1 positions
(position j scores the token after d_{j-1}; position 0 the token after the last committed one).
Every sampling option (penalties counting the drafts before each position, logit bias,
structured-output masks, temperature, top-k/top-p/min-p) shapes the target distribution p_j
before acceptance.

- greedy rows accept the longest prefix of drafts equal to the target's argmax, then emit the
  argmax at the first mismatch (or the bonus position);
- sampling rows accept d_j with probability min(1, p_j(d_j) / q_j(d_j)), and at the first
  rejection draw from max(p_j - q_j, 0) normalised; when all n are accepted one bonus token is
  drawn from p_n. `draft_probs` None means one-hot q (n-gram and greedy drafts).

This keeps greedy outputs identical to decoding without drafts and sampled outputs distributed
exactly as the target's. A row's randomness comes from its seed, stream and output position (the
final draw uses the same Gumbel noise as the plain sampler at that position), so seeded requests
are reproducible and a row without drafts draws exactly what the plain sampler draws.
Axis letters: S rows, Q positions (K + 1), K drafts, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from xlaserve.engine.input_batch import GREEDY_EPS, SamplingRows
from xlaserve.engine.sampler import (
    MAX_LOGPROBS,
    PenaltyState,
    apply_token_bitmask,
    first_argmax,
    top_logprobs,
)

ACCEPT_STREAM = 0x5EC  # folded into a position's key for its acceptance draw


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class VerifyOutput:
    tokens: jax.Array  # i32[S, Q]: accepted drafts, then the emitted token; -1 after
    num_tokens: jax.Array  # i32[S]: accepted drafts + 1
    token_logprobs: jax.Array  # f32[S, Q] raw-model logprob of each token
    top_ids: jax.Array  # i32[S, Q, MAX_LOGPROBS]
    top_logprobs: jax.Array  # f32[S, Q, MAX_LOGPROBS]


def draft_counts(drafts: jax.Array, num_drafts: jax.Array, vocab_size: int) -> jax.Array:
    """i32[S, Q, V]: how often each token occurs among the drafts before position j."""
    num_rows, k = drafts.shape
    live = jnp.arange(k)[None, :] < num_drafts[:, None]
    onehot = jax.nn.one_hot(drafts, vocab_size, dtype=jnp.int32) * live[..., None]
    zeros = jnp.zeros((num_rows, 1, vocab_size), jnp.int32)
    return jnp.concatenate([zeros, jnp.cumsum(onehot, axis=1)], axis=1)


def penalize(logits, b: SamplingRows, state: PenaltyState, drafts, num_drafts):
    """The sampler's penalties at every position, with the drafts before it counted as
    outputs (they are outputs if accepted)."""
    counts = state.output_counts[b.penalty_row][:, None, :] + draft_counts(
        drafts, num_drafts, logits.shape[-1]
    )
    seen = state.prompt_mask[b.penalty_row][:, None, :] | (counts > 0)
    rep = b.repetition_penalty[:, None, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - b.frequency_penalty[:, None, None] * counts
    logits = logits - b.presence_penalty[:, None, None] * (counts > 0)
    return logits + state.logit_bias[b.penalty_row][:, None, :]


def target_log_probs(processed, b: SamplingRows):
    """(log p [S, Q, V], token ids [S, Q, V]) of the temperature-scaled, filtered target, in
    sorted order when filters apply (vocab order otherwise)."""
    num_rows, q, vocab_size = processed.shape
    scaled = processed / jnp.maximum(b.temperature, GREEDY_EPS)[:, None, None]

    def filtered():
        vals, ids = jax.lax.top_k(scaled, vocab_size)
        probs = jax.nn.softmax(vals, axis=-1)
        rank = jnp.arange(vocab_size)[None, None, :]
        drop = rank >= b.top_k[:, None, None]
        drop |= (jnp.cumsum(probs, axis=-1) - probs) > b.top_p[:, None, None]
        drop |= probs < b.min_p[:, None, None] * probs[..., :1]
        return jax.nn.log_softmax(jnp.where(drop, -jnp.inf, vals), axis=-1), ids

    def unfiltered():
        ids = jax.lax.broadcasted_iota(jnp.int32, scaled.shape, 2)
        return jax.nn.log_softmax(scaled, axis=-1), ids

    return jax.lax.cond(b.use_filters, filtered, unfiltered)


def _row_key(seed, stream, step):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), step)


def acceptance_uniforms(b: SamplingRows, k: int) -> jax.Array:
    """f32[S, K]: the acceptance draw of each row at each draft position."""

    def row(seed, stream, step):
        def at(j):
            key = jax.random.fold_in(_row_key(seed, stream, step + j), ACCEPT_STREAM)
            return jax.random.uniform(key, (), jnp.float32)

        return jax.vmap(at)(jnp.arange(k))

    return jax.vmap(row)(b.seed, b.stream, b.step)


def verify(
    logits: jax.Array,
    b: SamplingRows,
    state: PenaltyState,
    drafts: jax.Array,
    num_drafts: jax.Array,
    draft_probs: jax.Array | None = None,
) -> tuple[VerifyOutput, PenaltyState]:
    """logits f32[S, Q, V], drafts i32[S, K], num_drafts i32[S] (0 for rows without drafts),
    draft_probs f32[S, K, V] or None (one-hot) -> the tokens each row emits, and the penalty
    state after them."""
    num_rows, q, vocab_size = logits.shape
    k = q - 1
    positions = jnp.arange(k)[None, :]
    live = positions < num_drafts[:, None]  # [S, K]
    drafts = jnp.where(live, drafts, 0)
    processed = jax.lax.cond(
        b.use_penalties, lambda: penalize(logits, b, state, drafts, num_drafts), lambda: logits
    )
    if b.token_bitmask is not None:
        mask = jnp.repeat(b.token_bitmask, q, axis=0)  # every position of a row: its mask
        processed = jax.lax.cond(
            b.use_bitmask,
            lambda: apply_token_bitmask(processed.reshape(-1, vocab_size), mask).reshape(
                processed.shape
            ),
            lambda: processed,
        )
    greedy = first_argmax(processed)  # [S, Q]
    greedy_accept = (drafts == greedy[:, :k]) & live

    def accepted_count(accept):
        return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # [S]

    def greedy_only():
        n = accepted_count(greedy_accept)
        return n, jnp.take_along_axis(greedy, n[:, None], axis=1)[:, 0]

    def with_random():
        random_rows = (b.temperature >= GREEDY_EPS)[:, None]
        logp, ids = target_log_probs(processed, b)
        p = jnp.exp(logp)
        is_draft = ids[:, :k, :] == drafts[:, :, None]  # [S, K, V]
        p_draft = jnp.sum(jnp.where(is_draft, p[:, :k], 0.0), axis=-1)  # [S, K]
        if draft_probs is None:
            q_draft, q_space = jnp.ones_like(p_draft), is_draft.astype(p.dtype)
        else:
            q_draft = jnp.take_along_axis(draft_probs, drafts[..., None], -1)[..., 0]
            q_space = jnp.take_along_axis(draft_probs, ids[:, :k], -1)
        random_accept = acceptance_uniforms(b, k) * q_draft < p_draft
        n = accepted_count(jnp.where(random_rows, random_accept & live, greedy_accept))
        at = n[:, None, None]
        p_at = jnp.take_along_axis(p, at, axis=1)[:, 0]  # [S, V]
        ids_at = jnp.take_along_axis(ids, at, axis=1)[:, 0]
        q_pad = jnp.concatenate([q_space, jnp.zeros_like(p[:, :1])], axis=1)
        rejected = (n < num_drafts)[:, None]  # else the bonus position: q is 0 there
        q_at = jnp.where(rejected, jnp.take_along_axis(q_pad, at, axis=1)[:, 0], 0.0)
        residual = jnp.maximum(p_at - q_at, 0.0)
        residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_at)

        def noise(seed, stream, step):
            return jax.random.gumbel(_row_key(seed, stream, step), (vocab_size,), jnp.float32)

        g = jax.vmap(noise)(b.seed, b.stream, b.step + n)  # vocab order, as the plain sampler
        pick = first_argmax(jnp.log(residual) + jnp.take_along_axis(g, ids_at, axis=-1))
        drawn = jnp.take_along_axis(ids_at, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
        final = jnp.where(
            random_rows[:, 0], drawn, jnp.take_along_axis(greedy, n[:, None], 1)[:, 0]
        )
        return n, final

    num_accepted, final = jax.lax.cond(b.use_random, with_random, greedy_only)
    slots = jnp.arange(q)[None, :]
    padded = jnp.concatenate([drafts, jnp.full((num_rows, 1), -1, jnp.int32)], axis=1)
    tokens = jnp.where(slots < num_accepted[:, None], padded, -1)
    tokens = jnp.where(slots == num_accepted[:, None], final[:, None], tokens)
    emitted = slots <= num_accepted[:, None]  # [S, Q]
    safe = jnp.maximum(tokens, 0)

    def logprobs():
        lp = jax.nn.log_softmax(logits, axis=-1)  # the raw model's, as the plain sampler
        top_lp, top_ids = top_logprobs(lp.reshape(-1, vocab_size))
        token_lp = jnp.take_along_axis(lp, safe[..., None], -1)[..., 0]
        return (token_lp, top_ids.reshape(num_rows, q, -1), top_lp.reshape(num_rows, q, -1))

    def no_logprobs():
        zeros = jnp.zeros((num_rows, q, MAX_LOGPROBS))
        return jnp.zeros((num_rows, q)), zeros.astype(jnp.int32), zeros

    token_lp, top_ids, top_lp = jax.lax.cond(b.use_logprobs, logprobs, no_logprobs)
    num_state_rows = state.output_counts.shape[0] - 1
    row = jnp.where(b.penalty_row < num_state_rows, b.penalty_row, num_state_rows + 1)
    write_rows = jnp.where(emitted, row[:, None], num_state_rows + 1)
    counts = state.output_counts.at[write_rows, safe].add(1, mode="drop")
    out = VerifyOutput(tokens, num_accepted + 1, token_lp, top_ids, top_lp)
    return out, PenaltyState(state.prompt_mask, counts, state.logit_bias)
