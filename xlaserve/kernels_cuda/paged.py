"""Model-level paged steps of the torch model, without the scheduler: the torch twin of
`xlaserve.models.generate.PagedModelRunner` (same page assignment, same ragged batches), used
by the parity tool and tests to compare prefill and paged decode logits across backends."""

import numpy as np
import torch

from xlaserve.engine.input_batch import Chunk, pack_tokens
from xlaserve.engine.runner_api import KVCacheSpec
from xlaserve.kernels_cuda.attention import AttentionMetadata
from xlaserve.kernels_cuda.model import TorchTransformer
from xlaserve.models.generate import StepOutput


class TorchPagedRunner:
    """Runs ragged steps of a torch model over its own paged cache (pages contiguous per
    sequence, or in the order `page_order` gives, to exercise shuffled page tables)."""

    def __init__(
        self,
        model: TorchTransformer,
        *,
        num_seqs: int,
        max_len: int,
        page_size: int = 16,
        page_order: np.ndarray | None = None,
    ):
        self.model, self.num_seqs, self.page_size = model, num_seqs, page_size
        self.pages_per_seq = -(-max_len // page_size)
        num_pages = num_seqs * self.pages_per_seq
        order = np.arange(num_pages) if page_order is None else np.asarray(page_order)
        if sorted(order.tolist()) != list(range(num_pages)):
            raise ValueError(f"page_order must be a permutation of range({num_pages})")
        self.page_indices = order.astype(np.int32).reshape(num_seqs, self.pages_per_seq)
        dtype = str(model.dtype).removeprefix("torch.")
        spec = KVCacheSpec.for_model(model.config, page_size=page_size, dtype=dtype)
        self.kv_cache = torch.zeros(spec.shape(num_pages), dtype=model.dtype, device=model.device)
        self.lens = np.zeros(num_seqs, np.int32)

    @torch.inference_mode()
    def step(self, new_tokens: list[list[int]], all_logits: bool = False) -> StepOutput:
        """Appends new_tokens[s] to sequence s (all sequences, possibly empty lists).

        Returns the logits f32 of each sequence's last new token [S, V] (and of every new
        token [T, V] with all_logits).
        """
        if len(new_tokens) != self.num_seqs:
            raise ValueError(f"need {self.num_seqs} token lists, got {len(new_tokens)}")
        q_lens = np.array([len(t) for t in new_tokens], np.int32)
        if np.any(self.lens + q_lens > self.pages_per_seq * self.page_size):
            raise ValueError("sequence longer than the runner's max_len")
        chunks = [
            Chunk(s, list(tokens), int(self.lens[s]), self.page_indices[s].tolist(), True)
            for s, tokens in enumerate(new_tokens)
        ]
        inputs = pack_tokens(
            chunks, int(q_lens.sum()), self.num_seqs, self.pages_per_seq, self.page_size
        )  # the engine's own packer, unpadded
        self.lens += q_lens
        device = self.model.device
        metadata = AttentionMetadata(
            *(torch.from_numpy(a) for a in (inputs.slot_mapping, inputs.cu_q_lens,
              inputs.kv_lens, inputs.page_indices, inputs.num_seqs))
        ).to(device)  # fmt: skip
        ids = torch.from_numpy(inputs.input_ids).long().to(device)
        positions = torch.from_numpy(inputs.positions).long().to(device)
        _, hidden = self.model(ids, positions, self.kv_cache, metadata)  # [T, D]
        last = torch.from_numpy(inputs.logits_indices).long().to(device)
        logits = self.model.compute_logits(hidden[last]).cpu().numpy()  # [S, V]
        every = self.model.compute_logits(hidden).cpu().numpy() if all_logits else None
        return StepOutput(logits, every)
