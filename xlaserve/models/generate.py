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

from xlaserve.engine.input_batch import Chunk, StepInputs, pack_tokens
from xlaserve.engine.runner_api import KVCacheSpec
from xlaserve.models.attention import AttentionMetadata
from xlaserve.models.transformer import Transformer
from xlaserve.quantization.kv_cache import kv_cache_storage


def round_up_pow2(n: int, minimum: int = 8) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


@dataclass
class StepOutput:
    logits: np.ndarray  # f32[S, V], the last new token of each sequence
    all_logits: np.ndarray | None  # f32[T, V] for every new token, when asked for


class PagedModelRunner:
    """Runs ragged steps of a model over its own paged cache (pages assigned contiguously)."""

    def __init__(
        self, model: Transformer, *, num_seqs: int, max_len: int, page_size: int = 16,
        kv_cache_dtype: str = "auto",
    ):  # fmt: skip
        """kv_cache_dtype: "auto" (the model's dtype), "int8" or "fp8" (EngineArgs's)."""
        self.graphdef, self.state = nnx.split(model)
        self.num_seqs, self.page_size = num_seqs, page_size
        self.pages_per_seq = -(-max_len // page_size)
        dtype, scales = kv_cache_storage(kv_cache_dtype, model.dtype.name)
        spec = KVCacheSpec.for_model(
            model.config, page_size=page_size, dtype=dtype, scale_elements=scales
        )
        self.kv_cache = jnp.zeros(spec.shape(num_seqs * self.pages_per_seq), jnp.dtype(dtype))
        self.page_indices = np.arange(num_seqs * self.pages_per_seq, dtype=np.int32).reshape(
            num_seqs, self.pages_per_seq
        )
        self.lens = np.zeros(num_seqs, np.int32)
        self._step = jax.jit(self._forward, donate_argnums=(1,))

    def _forward(self, state, kv_cache, inputs: StepInputs, rows, images=None):
        model = nnx.merge(self.graphdef, state)
        metadata = AttentionMetadata(
            inputs.slot_mapping, inputs.cu_q_lens, inputs.kv_lens, inputs.page_indices,
            inputs.num_seqs,
        )  # fmt: skip
        kv_cache, hidden = model(
            inputs.input_ids, inputs.positions, kv_cache, metadata, embeds_override=images
        )
        return kv_cache, model.compute_logits(hidden[rows])

    def step(
        self, new_tokens: list[list[int]], all_logits: bool = False, images=None, positions=None
    ) -> StepOutput:
        """Appends new_tokens[s] to sequence s (all sequences, possibly empty lists).
        images (multimodal): (embeddings f32[n, D], mask bool[n]) over the step's n new
        tokens in order, merged at the masked rows. positions (M-RoPE): i32[3, n]."""
        assert len(new_tokens) == self.num_seqs
        q_lens = np.array([len(t) for t in new_tokens], np.int32)
        if np.any(self.lens + q_lens > self.pages_per_seq * self.page_size):
            raise ValueError("sequence longer than the runner's max_len")
        num_tokens = int(q_lens.sum())
        padded = round_up_pow2(num_tokens)
        chunks = [
            Chunk(s, list(tokens), int(self.lens[s]), self.page_indices[s].tolist(), True)
            for s, tokens in enumerate(new_tokens)
        ]
        inputs = pack_tokens(
            chunks, padded, self.num_seqs, self.pages_per_seq, self.page_size
        )  # the engine's own packer
        self.lens += q_lens
        if positions is not None:
            wide = np.zeros((3, padded), np.int32)
            wide[:, :num_tokens] = positions
            inputs = inputs._replace(positions=wide)
        last = inputs.logits_indices
        rows = np.arange(padded, dtype=np.int32) if all_logits else last
        if images is not None:
            embeds = np.zeros((padded, images[0].shape[1]), np.float32)
            mask = np.zeros(padded, np.bool_)
            embeds[:num_tokens], mask[:num_tokens] = images
            images = (embeds, mask)
        self.kv_cache, logits = self._step(self.state, self.kv_cache, inputs, rows, images)
        logits = np.asarray(logits)
        if all_logits:
            return StepOutput(logits[last], logits[:num_tokens])
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
