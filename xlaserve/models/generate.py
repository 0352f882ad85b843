"""Model-level greedy generation over a paged KV cache, without the scheduler.

Every sequence gets its own contiguous run of pages; all sequences advance together in one
ragged batch per step (the first step is their prefills, then one decode token each). This is
the model's own check of paged prefill + decode, used by tests and parity tools.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlaserve.models.attention import AttentionMetadata
from xlaserve.models.transformer import Transformer


def round_up_pow2(n: int, minimum: int = 8) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


@dataclass
class StepOutput:
    logits: np.ndarray  # f32[S, V], the last new token of each sequence
    all_logits: np.ndarray | None  # f32[T, V] for every new token, when asked for


class PagedModelRunner:
    """Runs ragged steps of a model over its own paged cache (pages assigned contiguously)."""

    def __init__(self, model: Transformer, *, num_seqs: int, max_len: int, page_size: int = 16):
        self.graphdef, self.state = nnx.split(model)
        self.num_seqs, self.page_size = num_seqs, page_size
        self.pages_per_seq = -(-max_len // page_size)
        shape = model.kv_cache_shape(num_seqs * self.pages_per_seq, page_size)
        self.kv_cache = jnp.zeros(shape, model.embed[...].dtype)  # [L, P, ps, 2K, H]
        self.page_indices = np.arange(num_seqs * self.pages_per_seq, dtype=np.int32).reshape(
            num_seqs, self.pages_per_seq
        )
        self.lens = np.zeros(num_seqs, np.int32)
        self._step = jax.jit(self._forward, donate_argnums=(1,))

    def _forward(self, state, kv_cache, input_ids, positions, metadata, logits_indices):
        model = nnx.merge(self.graphdef, state)
        kv_cache, hidden = model(input_ids, positions, kv_cache, metadata)
        return kv_cache, model.compute_logits(hidden[logits_indices])

    def step(self, new_tokens: list[list[int]], all_logits: bool = False) -> StepOutput:
        """Appends new_tokens[s] to sequence s (all sequences, possibly empty lists)."""
        assert len(new_tokens) == self.num_seqs
        q_lens = np.array([len(t) for t in new_tokens], np.int32)
        if np.any(self.lens + q_lens > self.pages_per_seq * self.page_size):
            raise ValueError("sequence longer than the runner's max_len")
        num_tokens = int(q_lens.sum())
        padded = round_up_pow2(num_tokens)
        ids = np.zeros(padded, np.int32)
        positions = np.zeros(padded, np.int32)
        slots = np.full(padded, -1, np.int32)
        cu = np.zeros(self.num_seqs + 1, np.int32)
        cu[1:] = np.cumsum(q_lens)
        for s, tokens in enumerate(new_tokens):
            pos = np.arange(self.lens[s], self.lens[s] + len(tokens), dtype=np.int32)
            rows = slice(cu[s], cu[s + 1])
            ids[rows] = tokens
            positions[rows] = pos
            slots[rows] = self.page_indices[s, pos // self.page_size] * self.page_size + (
                pos % self.page_size
            )
        self.lens += q_lens
        metadata = AttentionMetadata(
            slot_mapping=jnp.asarray(slots),
            cu_q_lens=jnp.asarray(cu),
            kv_lens=jnp.asarray(self.lens),
            page_indices=jnp.asarray(self.page_indices),
            num_seqs=jnp.asarray([self.num_seqs], jnp.int32),
        )
        rows = np.arange(padded) if all_logits else np.maximum(cu[1:] - 1, 0)
        self.kv_cache, logits = self._step(
            self.state, self.kv_cache, jnp.asarray(ids), jnp.asarray(positions), metadata, rows
        )
        logits = np.asarray(logits)
        if all_logits:
            return StepOutput(logits[np.maximum(cu[1:] - 1, 0)], logits[:num_tokens])
        return StepOutput(logits, None)


def greedy_generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    page_size: int = 16,
    stop_token_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Greedy continuations of all prompts, generated together in ragged batches."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    max_len = max(len(p) for p in prompts) + max_new_tokens
    runner = PagedModelRunner(model, num_seqs=len(prompts), max_len=max_len, page_size=page_size)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    feed = [list(p) for p in prompts]
    for _ in range(max_new_tokens):
        next_ids = runner.step(feed).logits.argmax(-1)
        feed = []
        for s, token in enumerate(next_ids.tolist()):
            if done[s]:
                feed.append([])
                continue
            outputs[s].append(token)
            done[s] = token in stop_token_ids
            feed.append([] if done[s] else [token])
        if all(done):
            break
    return outputs
