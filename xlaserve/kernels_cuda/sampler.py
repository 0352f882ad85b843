"""Sampling in torch with the semantics of `xlaserve.engine.sampler` (the JAX sampler).

Per row: OpenAI presence/frequency penalties on output tokens, HF/vLLM repetition penalty on
prompt and output tokens, logit bias; greedy (argmax, first index on ties, as jnp.argmax) below
GREEDY_EPS temperature; otherwise Gumbel-max over logits / temperature among the tokens that
survive top-k, top-p and min-p; logprobs of the raw model distribution.

Randomness differs from JAX's by construction (torch has no threefry), so seeded tokens are not
the JAX backend's tokens. What holds on this backend too: each random row draws its Gumbel noise
from its own CPU generator seeded by a hash of (seed, stream, step), so a seeded request samples
the same tokens whatever else is in the batch, and on any device (the noise is drawn on the CPU).
Axis letters: S sequences (rows), V vocab.
"""

import hashlib
import struct
from dataclasses import dataclass

import torch

from xlaserve.engine.sampler import GREEDY_EPS, MAX_LOGPROBS


@dataclass(frozen=True)
class PenaltyRow:
    """One sequence's vocab-sized penalty inputs, on the logits' device."""

    prompt_mask: torch.Tensor  # bool[V] tokens present in the prompt
    output_counts: torch.Tensor  # f32[V] times each token was generated
    logit_bias: torch.Tensor  # f32[V]


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row options [S] (on the logits' device) and the host-side random streams."""

    temperature: torch.Tensor  # f32, 0 = greedy
    top_k: torch.Tensor  # i64, V = off
    top_p: torch.Tensor  # f32, 1 = off
    min_p: torch.Tensor  # f32, 0 = off
    presence_penalty: torch.Tensor  # f32
    frequency_penalty: torch.Tensor  # f32
    repetition_penalty: torch.Tensor  # f32, 1 = off
    penalties: list[PenaltyRow | None]  # per row; None = no penalty state
    streams: list[tuple[int, int, int]]  # per row (seed, stream, step), as the JAX sampler
    want_logprobs: bool = False
    # Structured outputs: i32[S, ceil(V/32)] allowed tokens (bit t%32 of word t//32), or None.
    token_bitmask: torch.Tensor | None = None


@dataclass(frozen=True)
class SamplerOutput:
    tokens: torch.Tensor  # i64[S]
    token_logprobs: torch.Tensor | None  # f32[S] raw-model logprob of the sampled token
    top_ids: torch.Tensor | None  # i64[S, MAX_LOGPROBS]
    top_logprobs: torch.Tensor | None  # f32[S, MAX_LOGPROBS], -inf past a small vocabulary


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """logits f32[S, V] with every row's penalties and bias applied (rows without state kept)."""
    rows = [i for i, p in enumerate(b.penalties) if p is not None]
    if not rows:
        return logits
    idx = torch.tensor(rows, device=logits.device)
    sub = logits[idx]  # [R, V]
    counts = torch.stack([b.penalties[i].output_counts for i in rows])  # [R, V]
    seen = torch.stack([b.penalties[i].prompt_mask for i in rows]) | (counts > 0)
    bias = torch.stack([b.penalties[i].logit_bias for i in rows])
    rep = b.repetition_penalty[idx, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - b.frequency_penalty[idx, None] * counts
    sub = sub - b.presence_penalty[idx, None] * (counts > 0).float()
    out = logits.clone()
    out[idx] = sub + bias
    return out


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf where a row's bitmask has the token's bit clear (as the JAX sampler)."""
    num_rows, vocab_size = logits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [S, W, 32]
    allowed = bits.reshape(num_rows, -1)[:, :vocab_size] != 0
    return logits.masked_fill(~allowed, float("-inf"))


def stream_seed(seed: int, stream: int, step: int) -> int:
    """A 63-bit generator seed from (seed, stream, step); distinct triples give unrelated seeds."""
    data = struct.pack("<Qqq", seed % 2**64, stream, step)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def gumbel_noise(streams: list[tuple[int, int, int]], rows: list[int], vocab_size: int):
    """f32[len(rows), V] Gumbel noise, each row from its own seeded CPU generator."""
    tiny = torch.finfo(torch.float32).tiny
    noise = []
    for i in rows:
        gen = torch.Generator(device="cpu").manual_seed(stream_seed(*streams[i]))
        u = torch.rand(vocab_size, generator=gen, dtype=torch.float32).clamp_(min=tiny)
        noise.append(-torch.log(-torch.log(u)))
    return torch.stack(noise)


def filtered_sample(scaled: torch.Tensor, noise: torch.Tensor, b: SamplingBatch, idx):
    """Gumbel-max over the tokens that survive top-k, top-p and min-p (in sorted order)."""
    vocab_size = scaled.shape[-1]
    sorted_vals, sorted_ids = torch.sort(scaled, dim=-1, descending=True, stable=True)  # [R, V]
    probs = torch.softmax(sorted_vals, dim=-1)
    rank = torch.arange(vocab_size, device=scaled.device)[None, :]
    # The top token always survives: its exclusive cumulative mass is 0 and rank 0 < k.
    drop = rank >= b.top_k[idx, None]
    drop |= (torch.cumsum(probs, dim=-1) - probs) > b.top_p[idx, None]
    drop |= probs < b.min_p[idx, None] * probs[:, :1]
    sorted_noise = torch.gather(noise, -1, sorted_ids)
    pick = torch.argmax(sorted_vals.masked_fill(drop, float("-inf")) + sorted_noise, dim=-1)
    return torch.gather(sorted_ids, -1, pick[:, None])[:, 0]


def top_logprobs(lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best MAX_LOGPROBS (logprobs, ids) per row, padded with -inf (id 0) past the vocab."""
    k = min(MAX_LOGPROBS, lp.shape[-1])
    top_lp, top_ids = torch.topk(lp, k, dim=-1)
    pad = MAX_LOGPROBS - k
    top_lp = torch.nn.functional.pad(top_lp, (0, pad), value=float("-inf"))
    return top_lp, torch.nn.functional.pad(top_ids, (0, pad))


def sample(logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
    """logits f32[S, V] -> sampled tokens [S] (and logprobs when b.want_logprobs)."""
    vocab_size = logits.shape[-1]
    processed = apply_penalties(logits, b)
    if b.token_bitmask is not None:
        processed = apply_token_bitmask(processed, b.token_bitmask)
    tokens = torch.argmax(processed, dim=-1)  # [S] greedy
    random_rows = (b.temperature >= GREEDY_EPS).nonzero()[:, 0].tolist()
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        scaled = processed[idx] / b.temperature[idx, None]  # [R, V]
        noise = gumbel_noise(b.streams, random_rows, vocab_size).to(logits.device)
        filters = (b.top_k[idx] < vocab_size) | (b.top_p[idx] < 1.0) | (b.min_p[idx] > 0.0)
        if bool(filters.any()):
            picked = filtered_sample(scaled, noise, b, idx)
        else:
            picked = torch.argmax(scaled + noise, dim=-1)
        tokens[idx] = picked
    if not b.want_logprobs:
        return SamplerOutput(tokens, None, None, None)
    lp = torch.log_softmax(logits, dim=-1)  # the raw model distribution
    top_lp, top_ids = top_logprobs(lp)
    return SamplerOutput(tokens, lp.gather(-1, tokens[:, None])[:, 0], top_ids, top_lp)
