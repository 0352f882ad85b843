"""Host batch -> padded bucket arrays -> jitted forward and sampling steps -> sampled tokens.

The forward graph is keyed by the token bucket T alone: per-sequence metadata is padded to the
sequence cap R (`max_num_seqs`) and the hidden rows to sample are gathered to [R, D] inside it.
The sampling graph is keyed by the sequence bucket S alone. All graphs compile at warm-up;
`compiles_after_warmup` counts (and logs) any later compile. The KV cache and the sampler's
penalty state are donated and updated in place.
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlaserve.engine import sampler
from xlaserve.engine.scheduler import SchedulerOutput
from xlaserve.models.attention import AttentionMetadata
from xlaserve.models.transformer import Transformer
from xlaserve.sharding import distributed, rules

logger = logging.getLogger(__name__)
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


def power_of_two_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """smallest, 2*smallest, ... capped by largest, which is always included."""
    buckets, b = [], max(1, min(smallest, largest))
    while b < largest:
        buckets.append(b)
        b *= 2
    return (*buckets, largest)


@dataclass(frozen=True)
class RunnerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    page_size: int
    num_pages: int
    seed: int = 0
    min_token_bucket: int = 16
    # An explicit token-bucket set (e.g. from `xlaserve bench buckets`); the token budget is
    # always added as the largest bucket.
    token_bucket_sizes: tuple[int, ...] | None = None

    @property
    def token_buckets(self) -> tuple[int, ...]:
        if self.token_bucket_sizes:
            sizes = {b for b in self.token_bucket_sizes if b < self.max_num_batched_tokens}
            return (*sorted(sizes), self.max_num_batched_tokens)
        return power_of_two_buckets(self.min_token_bucket, self.max_num_batched_tokens)

    @property
    def seq_buckets(self) -> tuple[int, ...]:
        return power_of_two_buckets(1, self.max_num_seqs)

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)


@dataclass
class SampledToken:
    token: int
    logprob: float | None = None  # raw-model logprob of `token`, when logprobs were asked for
    top_logprobs: list[tuple[int, float]] | None = None  # best `logprobs` (id, logprob)


@dataclass
class PromptLogprob:
    position: int  # index in the prompt of the scored token (>= 1)
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


@dataclass
class RunnerOutput:
    sampled: dict[int, SampledToken] = field(default_factory=dict)  # seq_id -> token
    prompt_logprobs: dict[int, list[PromptLogprob]] = field(default_factory=dict)


class CompileCounter:
    """Counts lowerings (new executables) made on the thread that is inside `track()`."""

    _active = threading.local()
    _installed = False

    def __init__(self):
        self.count = 0
        if not CompileCounter._installed:
            jax.monitoring.register_event_duration_secs_listener(CompileCounter._on_event)
            CompileCounter._installed = True

    @staticmethod
    def _on_event(event: str, duration: float, **kwargs) -> None:
        counter = getattr(CompileCounter._active, "counter", None)
        if event == LOWERING_EVENT and counter is not None:
            counter.count += 1

    def track(self):
        counter = self

        class Scope:
            def __enter__(self):
                self.previous = getattr(CompileCounter._active, "counter", None)
                CompileCounter._active.counter = counter

            def __exit__(self, *exc):
                CompileCounter._active.counter = self.previous

        return Scope()


def needs_penalty_state(params) -> bool:
    return bool(
        params.presence_penalty
        or params.frequency_penalty
        or params.repetition_penalty != 1.0
        or params.logit_bias
    )


class DeviceSteps:
    """The device half of the runner: parameters, KV cache, penalty state and the jitted steps.

    Every method takes host (numpy) inputs, so a multi-host leader can broadcast exactly these
    inputs and every process runs the same steps (see sharding/distributed.py). The last
    forward's outputs stay on the device for the sampling and prompt-logprob steps.
    """

    def __init__(self, model: Transformer, config: RunnerConfig, *, kv_dtype, mesh=None):
        self.config = config
        self.mesh = mesh
        self.graphdef, state = nnx.split(model)
        # Plain nested dicts of arrays: jit flattens them in C++ on every call, where nnx
        # Variables would cost a Python callback per parameter per step.
        self.params = state.to_pure_dict()
        cache_shape = model.kv_cache_shape(config.num_pages, config.page_size)
        state_zeros = partial(
            sampler.PenaltyState.zeros, config.max_num_seqs, model.config.vocab_size
        )
        if mesh is None:
            self.kv_cache = jnp.zeros(cache_shape, kv_dtype)
            self.penalty_state = state_zeros()
        else:
            self.kv_cache = jax.jit(
                lambda: jnp.zeros(cache_shape, kv_dtype),
                out_shardings=rules.kv_cache_sharding(model.config, mesh),
            )()
            self.penalty_state = jax.jit(state_zeros, out_shardings=rules.replicated(mesh))()
        self.rows = self.hidden = None
        self._forward = jax.jit(self._forward_fn, donate_argnums=(1,))
        self._sample = jax.jit(self._sample_fn, donate_argnums=(3,))
        self._prompt_logprobs = jax.jit(self._prompt_logprobs_fn)
        self._init_row = jax.jit(sampler.init_penalty_row, donate_argnums=(0,))

    def _forward_fn(self, params, kv_cache, input_ids, positions, metadata, logits_indices):
        model = nnx.merge(self.graphdef, params)
        kv_cache, hidden = model(input_ids, positions, kv_cache, metadata)  # hidden: [T, D]
        return kv_cache, hidden[logits_indices], hidden  # [R, D], [T, D]

    def _sample_fn(self, params, hidden_rows, batch: sampler.SamplingBatch, state):
        num_rows = batch.temperature.shape[0]  # S
        model = nnx.merge(self.graphdef, params)
        logits = model.compute_logits(hidden_rows[:num_rows])  # [S, V]
        return sampler.sample(logits, batch, state)

    def _prompt_logprobs_fn(self, params, hidden, targets):
        model = nnx.merge(self.graphdef, params)
        lp = jax.nn.log_softmax(model.compute_logits(hidden), axis=-1)  # [T, V]
        top_lp, top_ids = sampler.top_logprobs(lp)
        return jnp.take_along_axis(lp, targets[:, None], -1)[:, 0], top_ids, top_lp

    def _put(self, tree):
        """Host inputs as replicated global arrays when the mesh spans several processes."""
        if self.mesh is None or jax.process_count() == 1:
            return tree
        sharding = rules.replicated(self.mesh)
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: x[i]), tree
        )

    def forward(self, input_ids, positions, metadata, logits_indices) -> None:
        args = self._put((input_ids, positions, metadata, logits_indices))
        self.kv_cache, self.rows, self.hidden = self._forward(self.params, self.kv_cache, *args)

    def sample(self, batch: sampler.SamplingBatch) -> sampler.SamplerOutput:
        out, self.penalty_state = self._sample(
            self.params, self.rows, self._put(batch), self.penalty_state
        )
        return out

    def prompt_logprobs(self, targets):
        return self._prompt_logprobs(self.params, self.hidden, self._put(targets))

    def init_penalty_row(self, row, mask, counts, bias) -> None:
        args = self._put((row, mask, counts, bias))
        self.penalty_state = self._init_row(self.penalty_state, *args)


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated device array as numpy (its local copy, also on multi-host meshes)."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


class ModelRunner:
    """Host half: scheduler batches to padded bucket arrays and device results to tokens."""

    def __init__(self, model: Transformer, config: RunnerConfig, *, kv_dtype, mesh=None):
        self.config = config
        self.vocab_size = model.config.vocab_size
        self.steps = DeviceSteps(model, config, kv_dtype=kv_dtype, mesh=mesh)
        if jax.process_count() > 1 and jax.process_index() == 0:
            self.steps = distributed.BroadcastSteps(self.steps)  # followers replay each step
        self.penalty_rows: dict[int, int] = {}  # seq_id -> row
        self.free_penalty_rows = list(range(config.max_num_seqs))
        self.engine_seed = np.uint32(config.seed % 2**32)
        self.compiles = CompileCounter()
        self.compiles_at_warmup: int | None = None
        self.warmup_seconds: float | None = None
        self.device_seconds = 0.0  # dispatch of a step's forward -> its tokens on the host

    # ---- public -------------------------------------------------------------------------
    @property
    def compiles_after_warmup(self) -> int:
        if self.compiles_at_warmup is None:
            return 0
        return self.compiles.count - self.compiles_at_warmup

    def warmup(self) -> None:
        """Compiles every token bucket's forward (and prompt-logprob) graph and every sequence
        bucket's sampling graph, without touching the KV cache."""
        start = time.perf_counter()
        with self.compiles.track():
            for num_tokens in self.config.token_buckets:
                self.steps.forward(*self._pack_tokens([], num_tokens))
                self.steps.prompt_logprobs(np.zeros(num_tokens, np.int32))
            for num_seqs in self.config.seq_buckets:
                out = self.steps.sample(self._sampling_batch([], num_seqs))
            to_host(out.tokens)
            self._write_penalty_row(self.config.max_num_seqs, [], [], None)
        self.compiles_at_warmup = self.compiles.count
        self.warmup_seconds = time.perf_counter() - start

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Runs one scheduled step; returns the sampled token of every sequence with sample=True."""
        before = self.compiles.count
        with self.compiles.track():
            result = self._execute(out)
        if self.compiles_at_warmup is not None and self.compiles.count > before:
            logger.warning(
                "compiled %d new graph(s) after warm-up (batch of %d tokens, %d sequences)",
                self.compiles.count - before,
                out.num_batched_tokens,
                len(out.scheduled),
            )
        return result

    def release(self, seq_id: int) -> None:
        """Frees the sequence's penalty-state row (finished, aborted or preempted)."""
        row = self.penalty_rows.pop(seq_id, None)
        if row is not None:
            self.free_penalty_rows.append(row)

    # ---- host-side packing ----------------------------------------------------------------
    def _execute(self, out: SchedulerOutput) -> RunnerOutput:
        scheduled = out.scheduled
        num_tokens = sum(len(s.token_ids) for s in scheduled)
        bucket = next(b for b in self.config.token_buckets if b >= num_tokens)
        inputs = self._pack_tokens(scheduled, bucket)
        dispatched = time.perf_counter()
        self.steps.forward(*inputs)
        result = RunnerOutput()
        if any(s.seq.params.prompt_logprobs is not None for s in scheduled):
            result.prompt_logprobs = self._collect_prompt_logprobs(scheduled, bucket)
        sampling = [s for s in scheduled if s.sample]
        if not sampling:
            return result
        for s in sampling:
            if needs_penalty_state(s.seq.params) and s.seq.seq_id not in self.penalty_rows:
                row = self.free_penalty_rows.pop()
                self.penalty_rows[s.seq.seq_id] = row
                params = s.seq.params
                self._write_penalty_row(
                    row, s.seq.prompt_token_ids, s.seq.output_token_ids, params.logit_bias
                )
        num_seqs = next(b for b in self.config.seq_buckets if b >= len(scheduled))
        batch = self._sampling_batch(scheduled, num_seqs)
        sampled = self.steps.sample(batch)
        tokens = to_host(sampled.tokens)
        self.device_seconds += time.perf_counter() - dispatched
        want_logprobs = any(s.seq.params.logprobs is not None for s in sampling)
        if want_logprobs:
            token_lp = to_host(sampled.token_logprobs)
            top_ids, top_lp = to_host(sampled.top_ids), to_host(sampled.top_logprobs)
        for i, s in enumerate(scheduled):
            if not s.sample:
                continue
            k = s.seq.params.logprobs
            if k is None:
                result.sampled[s.seq.seq_id] = SampledToken(int(tokens[i]))
            else:
                top = list(zip(top_ids[i, :k].tolist(), top_lp[i, :k].tolist(), strict=True))
                result.sampled[s.seq.seq_id] = SampledToken(int(tokens[i]), float(token_lp[i]), top)
        return result

    def _pack_tokens(self, scheduled, bucket: int):
        c = self.config
        ids = np.zeros(bucket, np.int32)
        positions = np.zeros(bucket, np.int32)
        slots = np.full(bucket, -1, np.int32)
        cu_q_lens = np.zeros(c.max_num_seqs + 1, np.int32)
        kv_lens = np.zeros(c.max_num_seqs, np.int32)
        page_indices = np.zeros((c.max_num_seqs, c.pages_per_seq), np.int32)
        offset = 0
        for i, s in enumerate(scheduled):
            n = len(s.token_ids)
            pos = np.arange(s.start_pos, s.start_pos + n, dtype=np.int32)
            pages = np.asarray(s.page_ids, np.int32)
            ids[offset : offset + n] = s.token_ids
            positions[offset : offset + n] = pos
            slots[offset : offset + n] = pages[pos // c.page_size] * c.page_size + pos % c.page_size
            page_indices[i, : len(pages)] = pages
            kv_lens[i] = s.start_pos + n
            offset += n
            cu_q_lens[i + 1] = offset
        cu_q_lens[len(scheduled) + 1 :] = offset
        logits_indices = np.maximum(cu_q_lens[1:] - 1, 0)
        metadata = AttentionMetadata(
            slot_mapping=slots,
            cu_q_lens=cu_q_lens,
            kv_lens=kv_lens,
            page_indices=page_indices,
            num_seqs=np.asarray([len(scheduled)], np.int32),
        )
        return ids, positions, metadata, logits_indices

    def _sampling_batch(self, scheduled, num_rows: int) -> sampler.SamplingBatch:
        R, V = self.config.max_num_seqs, self.vocab_size
        temperature = np.zeros(num_rows, np.float32)
        top_k = np.full(num_rows, V, np.int32)
        top_p = np.ones(num_rows, np.float32)
        min_p = np.zeros(num_rows, np.float32)
        presence = np.zeros(num_rows, np.float32)
        frequency = np.zeros(num_rows, np.float32)
        repetition = np.ones(num_rows, np.float32)
        penalty_row = np.full(num_rows, R, np.int32)
        seed = np.full(num_rows, self.engine_seed, np.uint32)
        stream = np.zeros(num_rows, np.int32)
        step = np.zeros(num_rows, np.int32)
        logprobs = False
        for i, s in enumerate(scheduled):
            if not s.sample:
                continue
            p, seq = s.seq.params, s.seq
            temperature[i] = p.temperature
            top_k[i] = p.top_k if p.top_k > 0 else V
            top_p[i], min_p[i] = p.top_p, p.min_p
            presence[i], frequency[i] = p.presence_penalty, p.frequency_penalty
            repetition[i] = p.repetition_penalty
            penalty_row[i] = self.penalty_rows.get(seq.seq_id, R)
            if p.seed is not None:
                seed[i], stream[i] = p.seed % 2**32, seq.sample_index
            else:
                stream[i] = seq.seq_id
            step[i] = len(seq.output_token_ids)
            logprobs |= p.logprobs is not None
        random_rows = temperature >= sampler.GREEDY_EPS
        return sampler.SamplingBatch(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            presence_penalty=presence,
            frequency_penalty=frequency,
            repetition_penalty=repetition,
            penalty_row=penalty_row,
            seed=seed,
            stream=stream,
            step=step,
            use_penalties=np.bool_((penalty_row < R).any()),
            use_filters=np.bool_(
                (random_rows & ((top_k < V) | (top_p < 1.0) | (min_p > 0.0))).any()
            ),
            use_random=np.bool_(random_rows.any()),
            use_logprobs=np.bool_(logprobs),
        )

    def _write_penalty_row(self, row, prompt_ids, output_ids, logit_bias) -> None:
        mask, counts, bias = sampler.penalty_row_values(
            prompt_ids, output_ids, logit_bias, self.vocab_size
        )
        self.steps.init_penalty_row(np.int32(row), mask, counts, bias)

    def _collect_prompt_logprobs(self, scheduled, bucket) -> dict[int, list]:
        targets = np.zeros(bucket, np.int32)
        offset, spans = 0, []
        for s in scheduled:
            n = len(s.token_ids)
            seq = s.seq
            if seq.params.prompt_logprobs is not None:
                # Row at prompt position p scores the prompt token at p + 1.
                prompt = seq.prompt_token_ids
                last = min(s.start_pos + n, len(prompt) - 1)
                if last > s.start_pos:
                    rows = np.arange(offset, offset + last - s.start_pos)
                    targets[rows] = prompt[s.start_pos + 1 : last + 1]
                    spans.append((s, rows))
            offset += n
        if not spans:
            return {}
        token_lp, top_ids, top_lp = (to_host(x) for x in self.steps.prompt_logprobs(targets))
        result = {}
        for s, rows in spans:
            k = s.seq.params.prompt_logprobs
            result[s.seq.seq_id] = [
                PromptLogprob(
                    position=s.start_pos + 1 + j,
                    token=int(targets[r]),
                    logprob=float(token_lp[r]),
                    top_logprobs=list(
                        zip(top_ids[r, :k].tolist(), top_lp[r, :k].tolist(), strict=True)
                    ),
                )
                for j, r in enumerate(rows)
            ]
        return result
