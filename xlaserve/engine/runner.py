"""The JAX runner: the one input batch's arrays -> jitted forward and sampling steps -> tokens.

The forward graph is keyed by the token bucket T alone: per-sequence metadata is padded to the
sequence cap R (`max_num_seqs`) and the hidden rows to sample are gathered to [R, D] inside it.
The sampling graph is keyed by the sequence bucket S alone. All graphs compile at warm-up;
`compiles_after_warmup` counts (and logs) any later compile. The KV cache and the sampler's
penalty state are donated and updated in place.

Multi-host: the leader's device steps are broadcast before they run and every follower replays
them (`follow`), so all processes enter each collective together.
"""

import logging
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from xlaserve.engine import sampler
from xlaserve.engine.input_batch import (
    DraftRows,
    InputBatch,
    PreparedStep,
    SamplingRows,
    StepInputs,
    default_sampling_rows,
    pack_tokens,
    prompt_logprobs_buckets,
)
from xlaserve.engine.runner_api import (
    DeviceInfo,
    KVCacheSpec,
    PromptLogprob,
    RunnerConfig,
    RunnerOutput,
    RunnerStats,
    SampledToken,
    StepCosts,
)
from xlaserve.engine.scheduler_output import SchedulerOutput
from xlaserve.lora.device import LoRASlots
from xlaserve.models.attention import AttentionMetadata
from xlaserve.models.transformer import DecoderLayers, Transformer
from xlaserve.sharding import distributed, rules
from xlaserve.spec_decode import rejection
from xlaserve.spec_decode.proposer import NgramProposer, Proposer

logger = logging.getLogger(__name__)
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


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


class DeviceSteps:
    """The device half of the runner: parameters, KV cache, penalty state and the jitted steps.

    Every method takes host (numpy) inputs, so a multi-host leader can broadcast exactly these
    inputs and every process runs the same steps. The last forward's outputs stay on the device
    for the sampling and prompt-logprob steps.
    """

    def __init__(
        self,
        model: Transformer,
        config: RunnerConfig,
        spec: KVCacheSpec,
        mesh=None,
        aux_layers: tuple[int, ...] = (),
        vision=None,
    ):
        self.config = config
        # Multimodal: the VisionEncoder whose features the forward merges (None: text only).
        self.vision = vision
        self.mesh = mesh
        self.aux_layers = tuple(aux_layers)  # layers whose inputs the forward also keeps
        self.graphdef, state = nnx.split(model)
        # Plain nested dicts of arrays: jit flattens them in C++ on every call, where nnx
        # Variables would cost a Python callback per parameter per step.
        self.params = state.to_pure_dict()
        cache_shape = spec.shape(config.num_pages)
        kv_dtype = jnp.dtype(spec.dtype)
        state_zeros = partial(
            sampler.PenaltyState.zeros, config.max_num_seqs, model.config.vocab_size
        )
        # last_tokens i32[R]: the last sampling step's tokens by row, which the next forward
        # can feed without a round trip to the host (async scheduling).
        last_zeros = partial(jnp.zeros, (config.max_num_seqs,), jnp.int32)
        if mesh is None:
            self.kv_cache = jnp.zeros(cache_shape, kv_dtype)
            self.penalty_state = state_zeros()
            self.last_tokens = last_zeros()
        else:
            self.kv_cache = jax.jit(
                lambda: jnp.zeros(cache_shape, kv_dtype),
                out_shardings=rules.kv_cache_sharding(model.config, mesh),
            )()
            self.penalty_state = jax.jit(state_zeros, out_shardings=rules.replicated(mesh))()
            self.last_tokens = jax.jit(last_zeros, out_shardings=rules.replicated(mesh))()
        self.lora = None  # LoRA adapter slots (when the engine serves adapters)
        if config.max_loras:
            self.lora = LoRASlots(
                model.config,
                max_loras=config.max_loras,
                max_rank=config.max_lora_rank,
                dtype=model.dtype,
                per_layer=not isinstance(model.layers, DecoderLayers),
                mesh=mesh,
            )
        self.rows = self.hidden = self.spec_rows = self.aux = None
        self.forward_graph = jax.jit(self._forward_fn, donate_argnums=(1,))
        self.sample_graph = jax.jit(self._sample_fn, donate_argnums=(3,))
        self.verify_graph = jax.jit(self._verify_fn, donate_argnums=(4,))
        self._prompt_logprobs = jax.jit(self._prompt_logprobs_fn)
        self._init_row = jax.jit(sampler.init_penalty_row, donate_argnums=(0,))

    def _forward_fn(
        self, params, kv_cache, inputs: StepInputs, lora_weights, last_tokens, images=None
    ):
        model = nnx.merge(self.graphdef, params)
        rows = inputs.prev_token_rows
        input_ids = jnp.where(rows >= 0, last_tokens[jnp.maximum(rows, 0)], inputs.input_ids)
        metadata = AttentionMetadata(
            slot_mapping=inputs.slot_mapping,
            cu_q_lens=inputs.cu_q_lens,
            kv_lens=inputs.kv_lens,
            page_indices=inputs.page_indices,
            num_seqs=inputs.num_seqs,
        )
        out = model(
            input_ids, inputs.positions, kv_cache, metadata, lora_weights,
            inputs.lora_slots, self.aux_layers, images,
        )  # fmt: skip
        kv_cache, hidden = out[:2]
        aux = out[2] if self.aux_layers else None  # [T, len(aux_layers) * D]
        # [R, D], [T, D], [R, Q, D]
        rows, spec_rows = hidden[inputs.logits_indices], hidden[inputs.spec_indices]
        return kv_cache, rows, hidden, spec_rows, aux

    def _sample_fn(self, params, hidden_rows, batch: SamplingRows, state):
        num_rows = batch.temperature.shape[0]  # S
        model = nnx.merge(self.graphdef, params)
        logits = model.compute_logits(hidden_rows[:num_rows])  # [S, V]
        out, state = sampler.sample(logits, batch, state)
        last_tokens = jnp.zeros(self.config.max_num_seqs, jnp.int32).at[:num_rows].set(out.tokens)
        return out, state, last_tokens

    def _verify_fn(self, params, spec_rows, batch: SamplingRows, drafts: DraftRows, state):
        num_rows = batch.temperature.shape[0]  # S
        model = nnx.merge(self.graphdef, params)
        rows = spec_rows[:num_rows]  # [S, Q, D]
        logits = model.compute_logits(rows.reshape(-1, rows.shape[-1]))
        logits = logits.reshape(num_rows, rows.shape[1], -1)  # [S, Q, V]
        return rejection.verify(
            logits, batch, state, drafts.draft_token_ids, drafts.num_draft_tokens
        )

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

    def forward(self, inputs: StepInputs, images=None) -> None:
        """images (multimodal): (embeddings f32[T, D], mask bool[T]) merged at placeholder
        rows; a multimodal model always passes them (zeros without images: one graph per T)."""
        if self.vision is not None and images is None:
            num_tokens = len(inputs.input_ids)
            images = (np.zeros((num_tokens, self.vision.width), np.float32),
                      np.zeros(num_tokens, np.bool_))  # fmt: skip
        self.kv_cache, self.rows, self.hidden, self.spec_rows, self.aux = self.forward_graph(
            self.params,
            self.kv_cache,
            self._put(inputs),
            self.lora_weights,
            self.last_tokens,
            images,
        )

    def verify(self, batch: SamplingRows, drafts: DraftRows) -> rejection.VerifyOutput:
        out, self.penalty_state = self.verify_graph(
            self.params, self.spec_rows, batch, drafts, self.penalty_state
        )
        return out

    @property
    def lora_weights(self):
        """The LoRA slot buffers the forward reads (None without LoRA)."""
        return None if self.lora is None else self.lora.buffers

    def write_lora_slot(self, slot: int, adapter) -> None:
        """Puts a LoRA adapter (None: zeros) into a device slot, in place (no compile)."""
        self.lora.write(slot, adapter)

    def sample(self, batch: SamplingRows) -> sampler.SamplerOutput:
        out, self.penalty_state, self.last_tokens = self.sample_graph(
            self.params, self.rows, self._put(batch), self.penalty_state
        )
        return out

    def prompt_logprobs(self, targets: np.ndarray):
        return self._prompt_logprobs(self.params, self.hidden, self._put(targets))

    def init_penalty_row(self, row, mask, counts, bias) -> None:
        args = self._put((row, mask, counts, bias))
        self.penalty_state = self._init_row(self.penalty_state, *args)


@dataclass
class InFlightStep:
    """A dispatched step: its device outputs are still being computed."""

    step: PreparedStep
    out: SchedulerOutput
    result: RunnerOutput  # what is known without waiting (prompt logprobs)
    sampled: object | None  # SamplerOutput / VerifyOutput on the device; None: nothing sampled
    dispatched: float  # perf_counter at dispatch


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated device array as numpy (its local copy, also on multi-host meshes)."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


class ModelRunner:
    """The JAX backend's `Runner`: the input batch's arrays to tokens through DeviceSteps."""

    def __init__(
        self,
        model: Transformer,
        config: RunnerConfig,
        kv_cache_spec: KVCacheSpec,
        *,
        mesh=None,
        proposer: Proposer | None = None,
        vision=None,
    ):
        self.config = config
        if vision is not None and (mesh is not None or jax.process_count() > 1):
            raise ValueError("vision-language models run on one device: tensor/data parallel "
                             "meshes are not supported with images yet")  # fmt: skip
        self.proposer = proposer
        if model.config.mrope_section and not isinstance(proposer, NgramProposer | None):
            raise ValueError("M-RoPE models (Qwen2.5-VL) support speculative_config method "
                             "'ngram' only: draft and EAGLE models read 1D positions")  # fmt: skip
        if config.num_speculative_tokens and jax.process_count() > 1:
            raise ValueError("speculative decoding runs on one host: speculative_config is not "
                             "supported with multi-host meshes yet")  # fmt: skip
        self.kv_cache_spec = kv_cache_spec
        self.mesh = mesh
        self.vocab_size = model.config.vocab_size
        aux_layers = () if proposer is None else proposer.target_aux_layers
        self.vision = vision
        self.steps = DeviceSteps(model, config, kv_cache_spec, mesh, aux_layers, vision)
        self.weight_copies = model.weight_copies  # not counted in the parameter sizes
        self.leader = jax.process_count() > 1 and jax.process_index() == 0
        if self.leader:
            self.steps = distributed.BroadcastSteps(self.steps)  # followers replay each step
        self.batch = InputBatch(
            max_num_seqs=config.max_num_seqs,
            pages_per_seq=config.pages_per_seq,
            page_size=config.page_size,
            vocab_size=self.vocab_size,
            seed=config.seed,
            token_buckets=config.token_buckets,
            seq_buckets=config.seq_buckets,
            num_speculative_tokens=config.num_speculative_tokens,
            max_loras=config.max_loras,
            multimodal=vision is not None,
            mrope=bool(model.config.mrope_section),
        )
        self.compiles = CompileCounter()
        self.compiles_at_warmup: int | None = None
        self.warmup_seconds: float | None = None
        self.device_seconds = 0.0
        self.wait_seconds = 0.0
        self.step_costs: StepCosts | None = None
        self.propose_seconds = 0.0
        # seq_id -> sampling row of the last dispatched sampling step (async scheduling)
        self._pending_rows: dict[int, int] = {}

    # ---- the Runner contract --------------------------------------------------------------
    def device_info(self) -> DeviceInfo:
        devices = jax.devices()[:1] if self.mesh is None else list(self.mesh.devices.flat)
        params = {k: v for k, v in self.steps.params.items() if k not in self.weight_copies}
        leaves = jax.tree.leaves(params)
        return DeviceInfo(
            platform=devices[0].platform,
            num_devices=len(devices),
            mesh_shape={} if self.mesh is None else dict(self.mesh.shape),
            device_kind=devices[0].device_kind,
            parameter_count=sum(int(x.size) for x in leaves),
            parameter_bytes=sum(int(x.size) * x.dtype.itemsize for x in leaves),
        )

    def stats(self) -> RunnerStats:
        after = (
            0 if self.compiles_at_warmup is None else self.compiles.count - self.compiles_at_warmup
        )
        return RunnerStats(self.compiles.count, after, self.warmup_seconds, self.device_seconds,
                           self.step_costs, self.propose_seconds, self.wait_seconds)  # fmt: skip

    def shutdown(self) -> None:
        if self.leader:
            self.steps.stop_followers()

    def warmup(self) -> None:
        """Compiles every token bucket's forward (and prompt-logprob) graph and every sequence
        bucket's sampling graph, without touching the KV cache. Reports progress on stderr: a
        tqdm bar on a terminal, else one log line per graph ("graph i of n compiled")."""
        start = time.perf_counter()
        steps = self.steps
        graphs = []  # (name, call) in the order the calls depend on each other
        scoring = prompt_logprobs_buckets(self.config.token_buckets)
        for t in self.config.token_buckets:  # prompt logprobs read the forward's hidden rows
            graphs.append((f"forward T={t}", partial(steps.forward, self.empty_step_inputs(t))))
            if t in scoring:
                zeros = np.zeros(t, np.int32)
                graphs.append((f"prompt logprobs T={t}", partial(steps.prompt_logprobs, zeros)))
        for s in self.config.seq_buckets:
            graphs.append((f"sampler S={s}", partial(steps.sample, self.empty_sampling_rows(s))))
            if self.config.num_speculative_tokens:
                verify = partial(steps.verify, self.empty_sampling_rows(s), self.empty_drafts(s))
                graphs.append((f"verifier S={s}", verify))
        penalty_row = self.empty_penalty_row()
        graphs.append(("penalty row init", partial(steps.init_penalty_row, *penalty_row)))
        if self.proposer is not None:
            graphs += self.proposer.warmup_graphs(self)
        if self.vision is not None:  # one graph per tile bucket: no image size compiles later
            graphs += self.vision.warmup_graphs()
        if self.config.max_loras:  # every slot is empty before the first step: harmless
            graphs.append(("LoRA slot write", partial(steps.write_lora_slot, 1, None)))
        bar = tqdm(total=len(graphs), desc="warm-up", unit="graph",
                   disable=not sys.stderr.isatty())  # fmt: skip
        with self.compiles.track(), bar:
            for i, (name, call) in enumerate(graphs, 1):
                out = call()  # compiles synchronously; the run itself is dispatched
                if name == f"sampler S={self.config.seq_buckets[-1]}":
                    to_host(out.tokens)  # waits for the device once, as before
                bar.update()
                if bar.disable:  # not a terminal: log lines instead of a bar
                    logger.info("warm-up: graph %d of %d compiled (%s) after %.1fs", i,
                                len(graphs), name, time.perf_counter() - start)  # fmt: skip
        if self.config.num_speculative_tokens:
            self._time_buckets()
        self.compiles_at_warmup = self.compiles.count
        self.warmup_seconds = time.perf_counter() - start
        logger.info("warm-up compiled %d graphs in %.1fs", self.compiles.count, self.warmup_seconds)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        return self._gather(self.dispatch(out))

    @property
    def supports_async(self) -> bool:
        """Whether `dispatch`/`collect` may overlap steps (async scheduling): one host, and no
        drafts (they need each step's tokens on the host first)."""
        return not self.leader and self.proposer is None and not self.config.num_speculative_tokens

    def dispatch(self, out: SchedulerOutput) -> InFlightStep:
        """Packs the step and dispatches its device work; `collect` waits for its tokens.
        Pending tokens of the previous dispatched step are fed from the device."""
        before = self.compiles.count
        with self.compiles.track():
            step = self.batch.prepare(out, sampling=False, pending_rows=self._pending_rows)
            flight = self._launch(step, out)
        if self.compiles_at_warmup is not None and self.compiles.count > before:
            logger.warning(
                "compiled %d new graph(s) after warm-up (batch of %d tokens, %d sequences)",
                self.compiles.count - before,
                out.total_num_scheduled_tokens,
                out.num_seqs,
            )
        return flight

    def collect(self, flight: InFlightStep) -> RunnerOutput:
        """The tokens (and logprobs) of a dispatched step, once the device has them."""
        return self._gather(flight)

    def _time_buckets(self) -> None:
        """Times each token bucket's forward and each sequence bucket's sampler and verifier
        (all compiled already, best of two): the costs that decide how many drafts pay."""

        def seconds(call, result) -> float:
            best = float("inf")
            for _ in range(2):
                begin = time.perf_counter()
                out = call()
                to_host(result(out))
                best = min(best, time.perf_counter() - begin)
            return best

        steps = self.steps
        forward = {
            t: seconds(partial(steps.forward, self.empty_step_inputs(t)), lambda _: steps.rows)
            for t in self.config.token_buckets
        }
        sample, verify = {}, {}
        for s in self.config.seq_buckets:
            rows = self.empty_sampling_rows(s)
            sample[s] = seconds(partial(steps.sample, rows), lambda out: out.tokens)
            verify[s] = seconds(partial(steps.verify, rows, self.empty_drafts(s)),
                                lambda out: out.tokens)  # fmt: skip
        self.step_costs = StepCosts(forward, sample, verify)

    # ---- empty inputs (warm-up, followers, the bucket sweep) --------------------------------
    def empty_step_inputs(self, num_tokens: int) -> StepInputs:
        c = self.config
        inputs = pack_tokens([], num_tokens, c.max_num_seqs, c.pages_per_seq, c.page_size,
                             1 + c.num_speculative_tokens)  # fmt: skip
        if self.batch.mrope:  # M-RoPE: positions i32[3, T]
            inputs = inputs._replace(positions=np.zeros((3, num_tokens), np.int32))
        return inputs

    def empty_drafts(self, num_rows: int) -> DraftRows:
        k = self.config.num_speculative_tokens
        return DraftRows(np.zeros((num_rows, k), np.int32), np.zeros(num_rows, np.int32))

    def empty_sampling_rows(self, num_rows: int) -> SamplingRows:
        fields = default_sampling_rows(
            num_rows, vocab_size=self.vocab_size, none_row=self.config.max_num_seqs,
            seed=self.config.seed,
        )  # fmt: skip
        return SamplingRows(**fields)

    def empty_penalty_row(self) -> tuple:
        V = self.vocab_size
        row = np.int32(self.config.max_num_seqs)  # the "no penalties" row stays zero
        return row, np.zeros(V, np.bool_), np.zeros(V, np.int32), np.zeros(V, np.float32)

    # ---- one step ---------------------------------------------------------------------------
    def _execute(self, step: PreparedStep, out: SchedulerOutput) -> RunnerOutput:
        return self._gather(self._launch(step, out))

    def _launch(self, step: PreparedStep, out: SchedulerOutput) -> InFlightStep:
        """Dispatches the step's device work; its tokens stay on the device."""
        flight = InFlightStep(step, out, RunnerOutput(), None, time.perf_counter())
        if not step.chunks:
            return flight
        for slot, adapter in step.lora_writes:  # adapters entering the device for this step
            self.steps.write_lora_slot(slot, adapter)
        if self.vision is not None and step.image_placements:  # encodes cache misses first
            images = self.vision.merge_inputs(step.image_placements, len(step.inputs.input_ids))
            self.steps.forward(step.inputs, images)
        else:
            self.steps.forward(step.inputs)  # runs on the device while the host packs
        if self.proposer is not None:
            self.proposer.on_forward(step)
        if step.prompt_logprob_spans:
            flight.result.prompt_logprobs = self._prompt_logprobs(step)
        step = flight.step = self.batch.with_sampling(step, out)  # may wait for bitmasks
        if step.sampling is None:
            return flight
        for init in step.penalty_inits:
            self.steps.init_penalty_row(
                np.int32(init.row), init.prompt_mask, init.output_counts, init.logit_bias
            )
        if step.drafts is None:
            flight.sampled = self.steps.sample(step.sampling)
        else:
            flight.sampled = self.steps.verify(step.sampling, step.drafts)
        self._pending_rows = {seq_id: row for row, seq_id in step.sampling_seq_ids.items()}
        return flight

    def _gather(self, flight: InFlightStep) -> RunnerOutput:
        """Waits for a dispatched step's tokens and turns them into the runner's output."""
        step, out, result, sampled = flight.step, flight.out, flight.result, flight.sampled
        if sampled is None:
            if step.chunks and self.proposer is not None:  # a head that tracks every position
                result.drafts = self._propose(step, out, result)  # sees prefills
            return result
        waited = time.perf_counter()
        if step.drafts is None:
            emitted = to_host(sampled.tokens)[:, None]  # [S, 1]
            counts = None
        else:
            emitted, counts = to_host(sampled.tokens), to_host(sampled.num_tokens)  # [S, Q]
        self.wait_seconds += time.perf_counter() - waited
        self.device_seconds += time.perf_counter() - flight.dispatched
        if step.want_logprobs:
            token_lp = to_host(sampled.token_logprobs).reshape(len(emitted), -1)
            top_ids = to_host(sampled.top_ids).reshape(len(emitted), emitted.shape[1], -1)
            top_lp = to_host(sampled.top_logprobs).reshape(top_ids.shape)
        for row, seq_id in step.sampling_seq_ids.items():
            k = step.want_logprobs.get(row)
            n = 1 if counts is None else int(counts[row])
            tokens = []
            for j in range(n):
                token = int(emitted[row, j])
                if k is None:
                    tokens.append(SampledToken(token))
                else:
                    top = list(zip(top_ids[row, j, :k].tolist(), top_lp[row, j, :k].tolist(),
                                   strict=True))  # fmt: skip
                    tokens.append(SampledToken(token, float(token_lp[row, j]), top))
            result.sampled[seq_id] = tokens[-1]
            self.batch.resolve_pending(seq_id, tokens[-1].token)
            if n > 1:
                result.accepted[seq_id] = tokens[:-1]
        if self.proposer is not None:
            result.drafts = self._propose(step, out, result)
        return result

    def _propose(self, step: PreparedStep, out: SchedulerOutput, result: RunnerOutput):
        begin = time.perf_counter()
        emitted = {
            seq_id: [t.token for t in result.accepted.get(seq_id, ())] + [s.token]
            for seq_id, s in result.sampled.items()
        }
        wanted = [seq_id for seq_id in emitted if seq_id in out.propose_seq_ids]
        drafts = self.proposer.propose(self.batch, step, emitted, wanted)
        self.propose_seconds += time.perf_counter() - begin
        return drafts

    def _prompt_logprobs(self, step: PreparedStep) -> dict[int, list[PromptLogprob]]:
        targets = step.prompt_logprob_targets
        token_lp, top_ids, top_lp = (to_host(x) for x in self.steps.prompt_logprobs(targets))
        result = {}
        for span in step.prompt_logprob_spans:
            k = span.num_logprobs
            result[span.seq_id] = [
                PromptLogprob(
                    position=span.first_position + j,
                    token=int(targets[r]),
                    logprob=float(token_lp[r]),
                    top_logprobs=list(
                        zip(top_ids[r, :k].tolist(), top_lp[r, :k].tolist(), strict=True)
                    ),
                )
                for j, r in enumerate(span.rows)
            ]
        return result

    # ---- multi-host followers ---------------------------------------------------------------
    def follow(self) -> None:
        """A follower's loop: replays the leader's device steps until it sends STOP."""
        steps, recv = self.steps, partial(distributed.broadcast, is_source=False)
        while True:
            command, size = recv(np.zeros(2, np.int32)).tolist()
            if command == distributed.STOP:
                logger.info("leader sent stop")
                return
            if command == distributed.FORWARD:
                steps.forward(recv(self.empty_step_inputs(size)))
            elif command == distributed.SAMPLE:
                steps.sample(recv(self.empty_sampling_rows(size)))
            elif command == distributed.PROMPT_LOGPROBS:
                steps.prompt_logprobs(recv(np.zeros(size, np.int32)))
            elif command == distributed.INIT_ROW:
                steps.init_penalty_row(*recv(self.empty_penalty_row()))
            else:
                raise RuntimeError(f"unknown command {command} from the leader")
