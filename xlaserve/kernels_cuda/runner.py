"""The torch backend's runner: the engine's runner interface over the torch model.

Same contract as `xlaserve.engine.runner.ModelRunner` (`warmup`, `execute(SchedulerOutput) ->
RunnerOutput`, `release`, `compiles`, `compiles_after_warmup`, `warmup_seconds`) and the same
packing of a scheduled step into a flat ragged batch over the paged KV cache
[L, P, page_size, 2K, H]. Torch runs eagerly, so there are no shape buckets and nothing is
compiled (the Triton kernels compile once per shape class on first use, at warm-up).
Sampling follows the JAX sampler's semantics (see `kernels_cuda.sampler` for randomness).
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

from xlaserve.engine.runner import (
    PromptLogprob,
    RunnerConfig,
    RunnerOutput,
    SampledToken,
    needs_penalty_state,
)
from xlaserve.engine.sampler import penalty_row_values
from xlaserve.engine.scheduler import SchedulerOutput
from xlaserve.kernels_cuda import sampler
from xlaserve.kernels_cuda.attention import AttentionMetadata
from xlaserve.kernels_cuda.model import TorchTransformer


@dataclass
class NoCompiles:
    """The runner interface's compile counter; eager torch never compiles a graph."""

    count: int = 0


class TorchModelRunner:
    """Owns the torch model, its paged KV cache and per-sequence penalty inputs.

    Construct with the loaded model and the engine's RunnerConfig (buckets are ignored):
        loaded = load_torch_model("smollm2-135m-instruct", dtype="float32")
        runner = TorchModelRunner(loaded.model, RunnerConfig(...))
    or let `LLM(..., backend="torch")` / `EngineArgs(backend="torch")` build it.
    """

    def __init__(self, model: TorchTransformer, config: RunnerConfig):
        self.model, self.config = model, config
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        shape = model.kv_cache_shape(config.num_pages, config.page_size)
        self.kv_cache = torch.zeros(shape, dtype=model.dtype, device=self.device)
        self.engine_seed = config.seed % 2**32
        self.penalty_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # mask, bias
        self.compiles = NoCompiles()
        self.compiles_after_warmup = 0
        self.warmup_seconds: float | None = None

    def warmup(self) -> None:
        """One forward of a single padding token (slot -1, no sequence: the cache is not
        touched) and its logits, so the Triton kernels are built before the first request."""
        start = time.perf_counter()
        with torch.inference_mode():
            metadata = self._metadata([-1], [0, 0], [0], [[0]], 0)
            zero = torch.zeros(1, dtype=torch.long, device=self.device)
            _, hidden = self.model(zero, zero, self.kv_cache, metadata)
            self.model.compute_logits(hidden)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_seconds = time.perf_counter() - start

    def release(self, seq_id: int) -> None:
        """Drops the sequence's penalty inputs (finished, aborted or preempted)."""
        self.penalty_rows.pop(seq_id, None)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Runs one scheduled step; returns the sampled token of every sequence with sample=True."""
        scheduled = out.scheduled
        ids, positions, metadata = self._pack(scheduled)
        _, hidden = self.model(ids, positions, self.kv_cache, metadata)  # [T, D]
        result = RunnerOutput()
        if any(s.seq.params.prompt_logprobs is not None for s in scheduled):
            result.prompt_logprobs = self._prompt_logprobs(scheduled, hidden)
        sampling = [s for s in scheduled if s.sample]
        if not sampling:
            return result
        last_rows = np.cumsum([len(s.token_ids) for s in scheduled]) - 1
        rows = [int(r) for s, r in zip(scheduled, last_rows, strict=True) if s.sample]
        sampled = self._sample(sampling, hidden[torch.tensor(rows, device=self.device)])
        tokens = sampled.tokens.tolist()
        if sampled.token_logprobs is not None:
            token_lp = sampled.token_logprobs.tolist()
            top_ids, top_lp = sampled.top_ids.tolist(), sampled.top_logprobs.tolist()
        for i, s in enumerate(sampling):
            k = s.seq.params.logprobs
            if k is None:
                result.sampled[s.seq.seq_id] = SampledToken(tokens[i])
            else:
                top = list(zip(top_ids[i][:k], top_lp[i][:k], strict=True))
                result.sampled[s.seq.seq_id] = SampledToken(tokens[i], token_lp[i], top)
        return result

    # ---- packing ------------------------------------------------------------------------
    def _metadata(self, slots, cu_q_lens, kv_lens, page_rows, num_seqs) -> AttentionMetadata:
        width = max(1, max(len(p) for p in page_rows))
        pages = np.zeros((len(page_rows), width), np.int32)
        for i, p in enumerate(page_rows):
            pages[i, : len(p)] = p
        return AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int32),
            cu_q_lens=self._tensor(cu_q_lens, torch.int32),
            kv_lens=self._tensor(kv_lens, torch.int32),
            page_indices=self._tensor(pages, torch.int32),
            num_seqs=self._tensor([num_seqs], torch.int32),
        )

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        """Host values (list or numpy) as a tensor on the model's device."""
        return torch.as_tensor(np.asarray(values), dtype=dtype).to(self.device)

    def _pack(self, scheduled):
        """(input_ids i64[T], positions i64[T], metadata) for the step, unpadded."""
        page_size = self.config.page_size
        ids, positions, slots, kv_lens, cu = [], [], [], [], [0]
        for s in scheduled:
            n = len(s.token_ids)
            pos = np.arange(s.start_pos, s.start_pos + n)
            pages = np.asarray(s.page_ids, np.int64)
            ids.extend(s.token_ids)
            positions.append(pos)
            slots.append(pages[pos // page_size] * page_size + pos % page_size)
            kv_lens.append(s.start_pos + n)
            cu.append(cu[-1] + n)
        metadata = self._metadata(
            np.concatenate(slots), cu, kv_lens, [s.page_ids for s in scheduled], len(scheduled)
        )
        positions = np.concatenate(positions)
        return self._tensor(ids, torch.long), self._tensor(positions, torch.long), metadata

    # ---- sampling -----------------------------------------------------------------------
    def _penalty_row(self, seq) -> sampler.PenaltyRow:
        if seq.seq_id not in self.penalty_rows:  # prompt mask and bias never change
            mask, _, bias = penalty_row_values(
                seq.prompt_token_ids, [], seq.params.logit_bias, self.vocab_size
            )
            self.penalty_rows[seq.seq_id] = (
                torch.from_numpy(mask).to(self.device),
                torch.from_numpy(bias).to(self.device),
            )
        mask, bias = self.penalty_rows[seq.seq_id]
        outputs = torch.as_tensor(seq.output_token_ids, dtype=torch.long).to(self.device)
        counts = torch.bincount(outputs, minlength=self.vocab_size).float()
        return sampler.PenaltyRow(mask, counts, bias)

    def _sample(self, sampling, hidden_rows: torch.Tensor) -> sampler.SamplerOutput:
        """Samples one token per sequence in `sampling` from its hidden row [S, D]."""
        V = self.vocab_size
        temperature, top_k, top_p, min_p, presence, frequency, repetition = ([] for _ in range(7))
        penalties, streams = [], []
        for s in sampling:
            p, seq = s.seq.params, s.seq
            temperature.append(p.temperature)
            top_k.append(p.top_k if p.top_k > 0 else V)
            top_p.append(p.top_p)
            min_p.append(p.min_p)
            presence.append(p.presence_penalty)
            frequency.append(p.frequency_penalty)
            repetition.append(p.repetition_penalty)
            penalties.append(self._penalty_row(seq) if needs_penalty_state(p) else None)
            # The JAX sampler's streams: (request seed, sample index) or (engine seed, seq id).
            seed, stream = (
                (p.seed % 2**32, seq.sample_index)
                if p.seed is not None
                else (self.engine_seed, seq.seq_id)
            )
            streams.append((seed, stream, len(seq.output_token_ids)))
        f32 = torch.float32
        batch = sampler.SamplingBatch(
            temperature=self._tensor(temperature, f32),
            top_k=self._tensor(top_k, torch.long),
            top_p=self._tensor(top_p, f32),
            min_p=self._tensor(min_p, f32),
            presence_penalty=self._tensor(presence, f32),
            frequency_penalty=self._tensor(frequency, f32),
            repetition_penalty=self._tensor(repetition, f32),
            penalties=penalties,
            streams=streams,
            want_logprobs=any(s.seq.params.logprobs is not None for s in sampling),
        )
        logits = self.model.compute_logits(hidden_rows[: len(sampling)])  # [S, V]
        return sampler.sample(logits, batch)

    def _prompt_logprobs(self, scheduled, hidden: torch.Tensor) -> dict[int, list]:
        result, offset = {}, 0
        for s in scheduled:
            n, seq = len(s.token_ids), s.seq
            k = seq.params.prompt_logprobs
            # Row at prompt position p scores the prompt token at p + 1.
            last = min(s.start_pos + n, len(seq.prompt_token_ids) - 1)
            if k is not None and last > s.start_pos:
                count = last - s.start_pos
                targets = seq.prompt_token_ids[s.start_pos + 1 : last + 1]
                logits = self.model.compute_logits(hidden[offset : offset + count])  # [n, V]
                lp = torch.log_softmax(logits, dim=-1)
                target_t = torch.tensor(targets, device=self.device)
                token_lp = lp.gather(-1, target_t[:, None])[:, 0].tolist()
                top_lp, top_ids = (t.tolist() for t in sampler.top_logprobs(lp))
                result[seq.seq_id] = [
                    PromptLogprob(
                        position=s.start_pos + 1 + j,
                        token=targets[j],
                        logprob=token_lp[j],
                        top_logprobs=list(zip(top_ids[j][:k], top_lp[j][:k], strict=True)),
                    )
                    for j in range(count)
                ]
            offset += n
        return result
