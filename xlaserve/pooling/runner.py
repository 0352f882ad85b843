"""The JAX backend's `Runner` for pooling models: the one input batch's arrays -> the forward
pass -> one pooled row per sequence (`RunnerOutput.pooled`) instead of sampled tokens.

Each pooling sequence arrives whole in one step (the scheduler never chunks it, and skips
prefix-cache hits for it), so its hidden states are all in the step. Every graph a step can
need is compiled at warm-up; a compile after warm-up is counted and logged.

- Encoders (BERT): the step's sequences grouped by length into dense [S, L] batches
  (encoder_batch.py), one jitted graph per (S, L) shape: embeddings -> bidirectional layers ->
  pooling (-> the classifier). No KV cache.
- Decoders: the generative forward (`runner.DeviceSteps`, the paged KV cache written as usual
  and freed when the sequence finishes), then one pooling graph per T over its hidden states
  (-> the `score` head of `*ForSequenceClassification`).
"""

from __future__ import annotations

import logging
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlaserve.engine.input_batch import InputBatch, StepInputs, pack_tokens
from xlaserve.engine.runner import CompileCounter, DeviceSteps, to_host
from xlaserve.engine.runner_api import (
    DeviceInfo,
    KVCacheSpec,
    RunnerConfig,
    RunnerOutput,
    RunnerStats,
)
from xlaserve.engine.scheduler_output import SchedulerOutput
from xlaserve.pooling.encoder_batch import EncoderBuckets
from xlaserve.pooling.loader import LoadedPoolingModel
from xlaserve.pooling.params import PoolingTask
from xlaserve.pooling.poolers import METHOD_IDS, pool_hidden, pool_padded
from xlaserve.pooling.postprocess import finish

logger = logging.getLogger(__name__)


class EncoderSteps:
    """BERT: each length group [S, L] -> pooled rows [S, D] (or classifier logits [S, C]) in
    one graph per (S, L) shape (see encoder_batch.py)."""

    def __init__(self, loaded: LoadedPoolingModel, config: RunnerConfig):
        self.graphdef, state = nnx.split(loaded.trunk)
        self.params = state.to_pure_dict()
        self.classifier = loaded.config.has_classifier
        self.buckets = EncoderBuckets(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            min_length=config.min_token_bucket,
        )
        self.graph = jax.jit(self._run_fn)

    def _run_fn(self, params, input_ids, token_types, lengths, methods):
        model = nnx.merge(self.graphdef, params)
        hidden = model(input_ids, token_types, lengths)  # [S, L, D]
        pooled = pool_padded(hidden, lengths, methods)  # [S, D]
        return model.classify(pooled) if self.classifier else pooled

    def warmup_calls(self) -> list:
        calls = []
        for rows, length in self.buckets.shapes():
            zeros = np.zeros((rows, length), np.int32)
            empty = np.zeros(rows, np.int32)
            calls.append(partial(self.graph, self.params, zeros, zeros, empty, empty))
        return calls

    def run(self, chunks, tasks: list[PoolingTask]) -> np.ndarray:
        """Pooled rows of the step's sequences, in step order: f32[n, D] (or [n, C])."""
        groups = self.buckets.groups(
            [c.token_ids for c in chunks],
            [t.pair_start for t in tasks],
            [METHOD_IDS[t.pooling_type] for t in tasks],
        )
        pending = [
            (g, self.graph(self.params, g.input_ids, g.token_type_ids, g.lengths, g.methods))
            for g in groups
        ]  # all dispatched before the first is read back
        out = None
        for group, rows in pending:
            rows = to_host(rows)
            if out is None:
                out = np.empty((len(chunks), rows.shape[1]), np.float32)
            out[group.indices] = rows[: len(group.indices)]
        return out

    def parameters(self) -> list[jax.Array]:
        return jax.tree.leaves(self.params)


class DecoderSteps:
    """Llama/Qwen: the generative forward over the packed step, then pooling (and the score
    head) in one graph per token bucket T."""

    def __init__(self, loaded: LoadedPoolingModel, config: RunnerConfig, spec: KVCacheSpec):
        self.config = config
        self.forward = DeviceSteps(loaded.trunk, config, spec)
        self.head = loaded.head or {}
        self.graph = jax.jit(self._pool_fn)

    def _pool_fn(self, head, hidden, cu_q_lens, methods):
        pooled = pool_hidden(hidden, cu_q_lens, methods)  # [R, D]
        if not head:
            return pooled
        w = head["score"]  # [D, C]
        return jnp.dot(pooled.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def _run(self, inputs: StepInputs, methods: np.ndarray):
        self.forward.forward(inputs)
        return self.graph(self.head, self.forward.hidden, inputs.cu_q_lens, methods)

    def warmup_calls(self) -> list:
        c = self.config
        methods = np.zeros(c.max_num_seqs, np.int32)
        return [
            partial(self._run, pack_tokens([], t, c.max_num_seqs, c.pages_per_seq, c.page_size),
                    methods)
            for t in c.token_buckets
        ]  # fmt: skip

    def run(self, step, tasks: list[PoolingTask]) -> np.ndarray:
        """Pooled rows of the step's sequences (packed, whole prompts), in step order."""
        methods = np.zeros(self.config.max_num_seqs, np.int32)
        for row, task in enumerate(tasks):
            methods[row] = METHOD_IDS[task.pooling_type]
        return to_host(self._run(step.inputs, methods))[: len(tasks)]

    def parameters(self) -> list[jax.Array]:
        return jax.tree.leaves((self.forward.params, self.head))


class PoolingRunner:
    """A `Runner` (engine/runner_api.py) whose outputs are pooled rows, not tokens."""

    def __init__(self, loaded: LoadedPoolingModel, config: RunnerConfig, spec: KVCacheSpec):
        self.config = config
        self.kv_cache_spec = spec
        self.encoder = loaded.is_encoder
        self.steps = (
            EncoderSteps(loaded, config) if self.encoder else DecoderSteps(loaded, config, spec)
        )
        self.batch = InputBatch(
            max_num_seqs=config.max_num_seqs,
            pages_per_seq=config.pages_per_seq,
            page_size=config.page_size,
            vocab_size=loaded.config.vocab_size,
            seed=config.seed,
            token_buckets=config.token_buckets,
            seq_buckets=config.seq_buckets,
        )
        self.tasks: dict[int, PoolingTask] = {}  # seq_id -> its pooling, while in the batch
        self.compiles = CompileCounter()
        self.compiles_at_warmup: int | None = None
        self.warmup_seconds: float | None = None
        self.device_seconds = 0.0

    # ---- the Runner contract ----------------------------------------------------------------
    def device_info(self) -> DeviceInfo:
        device = jax.devices()[0]
        leaves = self.steps.parameters()
        return DeviceInfo(
            platform=device.platform,
            num_devices=1,
            device_kind=device.device_kind,
            parameter_count=sum(int(x.size) for x in leaves),
            parameter_bytes=sum(int(x.size) * x.dtype.itemsize for x in leaves),
        )

    def stats(self) -> RunnerStats:
        after = 0 if self.compiles_at_warmup is None else (
            self.compiles.count - self.compiles_at_warmup
        )  # fmt: skip
        # Steps run one at a time: the host waits for the whole device time.
        return RunnerStats(self.compiles.count, after, self.warmup_seconds, self.device_seconds,
                           wait_seconds=self.device_seconds)  # fmt: skip

    def shutdown(self) -> None:
        pass

    def warmup(self) -> None:
        """Compiles every graph a step can need (on empty inputs)."""
        start = time.perf_counter()
        with self.compiles.track():
            for call in self.steps.warmup_calls():
                out = call()
            to_host(out)
        self.compiles_at_warmup = self.compiles.count
        self.warmup_seconds = time.perf_counter() - start
        logger.info("pooling warm-up compiled %d graphs in %.1fs", self.compiles.count,
                    self.warmup_seconds)  # fmt: skip

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for seq_id in out.finished_seq_ids:
            self.tasks.pop(seq_id, None)
        for new in out.new_seqs:
            if new.pooling is None:
                raise ValueError(f"sequence {new.seq_id} has no pooling task: this engine "
                                 "serves a pooling model")  # fmt: skip
            self.tasks[new.seq_id] = new.pooling
        # Encoders run dense length groups (no packed arrays needed); decoders run packed.
        step = None if self.encoder else self.batch.prepare(out, sampling=False)
        chunks = self.batch.update(out) if self.encoder else step.chunks
        result = RunnerOutput()
        if not chunks:
            return result
        for c in chunks:
            if c.start_pos != 0 or not c.sample:  # the scheduler's promise, checked
                raise RuntimeError(f"pooling sequence {c.seq_id} was not scheduled whole")
        tasks = [self.tasks[c.seq_id] for c in chunks]
        before = self.compiles.count
        dispatched = time.perf_counter()
        with self.compiles.track():
            pooled = self.steps.run(chunks if self.encoder else step, tasks)
        self.device_seconds += time.perf_counter() - dispatched
        if self.compiles_at_warmup is not None and self.compiles.count > before:
            logger.warning("compiled %d new graph(s) after warm-up (%d sequences)",
                           self.compiles.count - before, len(chunks))  # fmt: skip
        for row, (c, task) in enumerate(zip(chunks, tasks, strict=True)):
            result.pooled[c.seq_id] = finish(pooled[row], task)
        return result
