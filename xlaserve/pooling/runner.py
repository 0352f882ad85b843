"""The JAX backend's `Runner` for pooling models: the one input batch's arrays -> the forward
pass -> one pooled row per sequence (`RunnerOutput.pooled`) instead of sampled tokens.

Each pooling sequence arrives whole in one step (the scheduler never chunks it, and skips
prefix-cache hits for it), so its hidden states are all in the step. Graphs are keyed by the
token bucket T alone, per-sequence arrays padded to the sequence cap R, as for generation:
|T buckets| graphs, all compiled at warm-up; a compile after warm-up is counted and logged.

- Encoders (BERT): one jitted graph per T: embeddings -> bidirectional layers (each token sees
  its own sequence) -> pooling (-> the classifier). No KV cache.
- Decoders: the generative forward (`runner.DeviceSteps`, the paged KV cache written as usual
  and freed when the sequence finishes), then one pooling graph per T over its hidden states
  (-> the `score` head of `*ForSequenceClassification`).
"""

from __future__ import annotations

import logging
import time

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
from xlaserve.pooling.loader import LoadedPoolingModel
from xlaserve.pooling.params import PoolingTask
from xlaserve.pooling.poolers import METHOD_IDS, finish, pool_hidden, token_rows

logger = logging.getLogger(__name__)


class EncoderSteps:
    """BERT: tokens -> pooled rows [R, D] (or classifier logits [R, C]) in one graph per T."""

    def __init__(self, loaded: LoadedPoolingModel):
        self.graphdef, state = nnx.split(loaded.trunk)
        self.params = state.to_pure_dict()
        self.classifier = loaded.config.has_classifier
        self.graph = jax.jit(self._run_fn)

    def _run_fn(self, params, inputs: StepInputs, token_types, methods):
        model = nnx.merge(self.graphdef, params)
        segments = token_rows(inputs.cu_q_lens, inputs.input_ids.shape[0])  # [T]
        hidden = model(inputs.input_ids, inputs.positions, token_types, segments)  # [T, D]
        pooled = pool_hidden(hidden, inputs.cu_q_lens, methods)  # [R, D]
        return model.classify(pooled) if self.classifier else pooled

    def run(self, inputs: StepInputs, token_types: np.ndarray, methods: np.ndarray):
        return self.graph(self.params, inputs, token_types, methods)

    def parameters(self) -> list[jax.Array]:
        return jax.tree.leaves(self.params)


class DecoderSteps:
    """Llama/Qwen: the generative forward, then pooling (and the score head) per T."""

    def __init__(self, loaded: LoadedPoolingModel, config: RunnerConfig, spec: KVCacheSpec):
        self.forward = DeviceSteps(loaded.trunk, config, spec)
        self.head = loaded.head or {}
        self.graph = jax.jit(self._pool_fn)

    def _pool_fn(self, head, hidden, cu_q_lens, methods):
        pooled = pool_hidden(hidden, cu_q_lens, methods)  # [R, D]
        if not head:
            return pooled
        w = head["score"]  # [D, C]
        return jnp.dot(pooled.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def run(self, inputs: StepInputs, token_types: np.ndarray, methods: np.ndarray):
        del token_types  # decoders have none
        self.forward.forward(inputs)
        return self.graph(self.head, self.forward.hidden, inputs.cu_q_lens, methods)

    def parameters(self) -> list[jax.Array]:
        return jax.tree.leaves((self.forward.params, self.head))


class PoolingRunner:
    """A `Runner` (engine/runner_api.py) whose outputs are pooled rows, not tokens."""

    def __init__(self, loaded: LoadedPoolingModel, config: RunnerConfig, spec: KVCacheSpec):
        self.config = config
        self.kv_cache_spec = spec
        self.steps = (
            EncoderSteps(loaded) if loaded.is_encoder else DecoderSteps(loaded, config, spec)
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
        return RunnerStats(self.compiles.count, after, self.warmup_seconds, self.device_seconds)

    def shutdown(self) -> None:
        pass

    def warmup(self) -> None:
        """Compiles the graphs of every token bucket (on empty inputs)."""
        start = time.perf_counter()
        c = self.config
        with self.compiles.track():
            for t in c.token_buckets:
                inputs = pack_tokens([], t, c.max_num_seqs, c.pages_per_seq, c.page_size)
                out = self.steps.run(inputs, np.zeros(t, np.int32), self._methods([]))
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
        step = self.batch.prepare(out, sampling=False)
        result = RunnerOutput()
        if not step.chunks:
            return result
        num_tokens = step.inputs.input_ids.shape[0]
        token_types = np.zeros(num_tokens, np.int32)
        offset = 0
        for c in step.chunks:
            if c.start_pos != 0 or not c.sample:  # the scheduler's promise, checked
                raise RuntimeError(f"pooling sequence {c.seq_id} was not scheduled whole")
            pair_start = self.tasks[c.seq_id].pair_start
            if pair_start is not None:
                token_types[offset + pair_start : offset + len(c.token_ids)] = 1
            offset += len(c.token_ids)
        tasks = [self.tasks[c.seq_id] for c in step.chunks]
        before = self.compiles.count
        dispatched = time.perf_counter()
        with self.compiles.track():
            pooled = to_host(self.steps.run(step.inputs, token_types, self._methods(tasks)))
        self.device_seconds += time.perf_counter() - dispatched
        if self.compiles_at_warmup is not None and self.compiles.count > before:
            logger.warning("compiled %d new graph(s) after warm-up (batch of %d tokens)",
                           self.compiles.count - before, num_tokens)  # fmt: skip
        for row, (c, task) in enumerate(zip(step.chunks, tasks, strict=True)):
            result.pooled[c.seq_id] = finish(pooled[row], task)
        return result

    def _methods(self, tasks: list[PoolingTask]) -> np.ndarray:
        methods = np.zeros(self.config.max_num_seqs, np.int32)
        for row, task in enumerate(tasks):
            methods[row] = METHOD_IDS[task.pooling_type]
        return methods
