"""The torch backend's runner: the engine's `Runner` contract over the torch model.

It consumes the same input batch as the JAX runner (`xlaserve.engine.input_batch`): the arrays of
a step, unpadded (torch runs eagerly, so there are no shape buckets and nothing is compiled; the
Triton kernels compile once per shape class on first use, at warm-up), wrapped as tensors.
Sampling follows the JAX sampler's semantics (see `kernels_cuda.sampler` for randomness).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from xlaserve.engine.input_batch import InputBatch, PreparedStep, StepInputs, pack_tokens
from xlaserve.engine.runner_api import (
    DeviceInfo,
    KVCacheSpec,
    PromptLogprob,
    RunnerConfig,
    RunnerOutput,
    RunnerStats,
    SampledToken,
)
from xlaserve.engine.scheduler_output import SchedulerOutput
from xlaserve.kernels_cuda import sampler
from xlaserve.kernels_cuda.attention import AttentionMetadata
from xlaserve.kernels_cuda.model import TorchTransformer

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchModelRunner:
    """Owns the torch model, its paged KV cache [L, P, page_size, 2K, H] and penalty inputs.

    Build it with `LLM(..., backend="torch")` / `EngineArgs(backend="torch")`, or directly:
        loaded = load_torch_model("smollm2-135m-instruct", dtype="float32")
        spec = KVCacheSpec.for_model(loaded.config, page_size=16, dtype="float32")
        runner = TorchModelRunner(loaded.model, RunnerConfig(...), spec)
    """

    def __init__(self, model: TorchTransformer, config: RunnerConfig, kv_cache_spec: KVCacheSpec):
        self.model, self.config = model, config
        self.kv_cache_spec = kv_cache_spec
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self.kv_cache = torch.zeros(
            kv_cache_spec.shape(config.num_pages),
            dtype=TORCH_DTYPES[kv_cache_spec.dtype],
            device=self.device,
        )
        self.batch = InputBatch(
            max_num_seqs=config.max_num_seqs,
            pages_per_seq=config.pages_per_seq,
            page_size=config.page_size,
            vocab_size=self.vocab_size,
            seed=config.seed,
        )
        # penalty row -> (prompt mask, logit bias) on the device, rewritten whenever the input
        # batch hands the row to a new sequence; output counts come from the batch's tokens.
        self.penalty_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.warmup_seconds: float | None = None
        self.device_seconds = 0.0

    # ---- the Runner contract ------------------------------------------------------------
    def device_info(self) -> DeviceInfo:
        params = list(self.model.parameters())
        kind = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return DeviceInfo(
            platform=self.device.type,
            num_devices=1,
            device_kind=kind,
            parameter_count=sum(p.numel() for p in params),
            parameter_bytes=sum(p.numel() * p.element_size() for p in params),
        )

    def stats(self) -> RunnerStats:
        # Eager (no graphs), steps one at a time: the host waits for the whole device time.
        return RunnerStats(0, 0, self.warmup_seconds, self.device_seconds,
                           wait_seconds=self.device_seconds)  # fmt: skip

    def shutdown(self) -> None:
        pass

    def warmup(self) -> None:
        """One forward of a single padding token (slot -1, no sequence: the cache is not
        touched) and its logits, so the Triton kernels are built before the first request."""
        start = time.perf_counter()
        c = self.config
        with torch.inference_mode():
            inputs = pack_tokens([], 1, 1, c.pages_per_seq, c.page_size)
            _, hidden = self.model(*self._wrap(inputs), self.kv_cache, self._metadata(inputs))
            self.model.compute_logits(hidden)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_seconds = time.perf_counter() - start

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        step = self.batch.prepare(out)
        result = RunnerOutput()
        if not step.chunks:
            return result
        start = time.perf_counter()
        inputs = step.inputs
        _, hidden = self.model(*self._wrap(inputs), self.kv_cache, self._metadata(inputs))
        if step.prompt_logprob_spans:
            result.prompt_logprobs = self._prompt_logprobs(step, hidden)
        if step.sampling is None:
            return result
        rows = list(step.sampling_seq_ids)
        last = torch.as_tensor(inputs.logits_indices[rows], device=self.device)
        sampled = sampler.sample(self.model.compute_logits(hidden[last]), self._sampling(step))
        tokens = sampled.tokens.tolist()
        self.device_seconds += time.perf_counter() - start
        if sampled.token_logprobs is not None:
            token_lp = sampled.token_logprobs.tolist()
            top_ids, top_lp = sampled.top_ids.tolist(), sampled.top_logprobs.tolist()
        for i, (row, seq_id) in enumerate(step.sampling_seq_ids.items()):
            k = step.want_logprobs.get(row)
            if k is None:
                result.sampled[seq_id] = SampledToken(tokens[i])
            else:
                top = list(zip(top_ids[i][:k], top_lp[i][:k], strict=True))
                result.sampled[seq_id] = SampledToken(tokens[i], token_lp[i], top)
        return result

    # ---- wrapping the input batch's arrays ------------------------------------------------
    def _tensor(self, values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(values, dtype=dtype).to(self.device)

    def _wrap(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tensor(inputs.input_ids, torch.long), self._tensor(
            inputs.positions, torch.long
        )

    def _metadata(self, inputs: StepInputs) -> AttentionMetadata:
        return AttentionMetadata(
            *(self._tensor(a, torch.int32) for a in (inputs.slot_mapping, inputs.cu_q_lens,
              inputs.kv_lens, inputs.page_indices, inputs.num_seqs))
        )  # fmt: skip

    def _sampling(self, step: PreparedStep) -> sampler.SamplingBatch:
        """The torch sampler's batch: the rows that sample, in order."""
        rows = np.fromiter(step.sampling_seq_ids, np.int64)
        s = step.sampling
        for init in step.penalty_inits:  # prompt mask and bias never change
            self.penalty_rows[init.row] = (
                torch.from_numpy(init.prompt_mask).to(self.device),
                torch.from_numpy(init.logit_bias).to(self.device),
            )
        penalties = []
        for row, seq_id in step.sampling_seq_ids.items():
            prow = int(s.penalty_row[row])
            if prow == self.config.max_num_seqs:
                penalties.append(None)
                continue
            mask, bias = self.penalty_rows[prow]
            outputs = torch.as_tensor(self.batch.output_token_ids(seq_id), dtype=torch.long)
            counts = torch.bincount(outputs, minlength=self.vocab_size).float().to(self.device)
            penalties.append(sampler.PenaltyRow(mask, counts, bias))
        f32 = torch.float32
        return sampler.SamplingBatch(
            temperature=self._tensor(s.temperature[rows], f32),
            top_k=self._tensor(s.top_k[rows], torch.long),
            top_p=self._tensor(s.top_p[rows], f32),
            min_p=self._tensor(s.min_p[rows], f32),
            presence_penalty=self._tensor(s.presence_penalty[rows], f32),
            frequency_penalty=self._tensor(s.frequency_penalty[rows], f32),
            repetition_penalty=self._tensor(s.repetition_penalty[rows], f32),
            penalties=penalties,
            # The JAX sampler's streams: (request seed, sample index) or (engine seed, seq id).
            streams=[(int(s.seed[r]), int(s.stream[r]), int(s.step[r])) for r in rows],
            want_logprobs=bool(step.want_logprobs),
            token_bitmask=self._tensor(s.token_bitmask[rows], torch.int32)
            if s.use_bitmask
            else None,
        )

    def _prompt_logprobs(self, step: PreparedStep, hidden: torch.Tensor) -> dict[int, list]:
        result = {}
        targets = step.prompt_logprob_targets
        for span in step.prompt_logprob_spans:
            k, rows = span.num_logprobs, span.rows
            index = torch.as_tensor(rows, device=self.device)
            lp = torch.log_softmax(self.model.compute_logits(hidden[index]), dim=-1)  # [n, V]
            target = torch.as_tensor(targets[rows], dtype=torch.long, device=self.device)
            token_lp = lp.gather(-1, target[:, None])[:, 0].tolist()
            top_lp, top_ids = (t.tolist() for t in sampler.top_logprobs(lp))
            result[span.seq_id] = [
                PromptLogprob(
                    position=span.first_position + j,
                    token=int(targets[r]),
                    logprob=token_lp[j],
                    top_logprobs=list(zip(top_ids[j][:k], top_lp[j][:k], strict=True)),
                )
                for j, r in enumerate(rows)
            ]
        return result
