"""The engine: add_request / step / abort_request over the scheduler, runner and detokenizer."""

import itertools
import logging
import time
from dataclasses import dataclass, field

import jax
from jax.sharding import Mesh

from xlaserve.checkpoints.loader import load_model
from xlaserve.config import EngineArgs, enable_compilation_cache, kv_cache_pages
from xlaserve.engine.detokenizer import IncrementalDetokenizer
from xlaserve.engine.outputs import (
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from xlaserve.engine.request import RequestStatus, Sequence
from xlaserve.engine.runner import ModelRunner, RunnerConfig, SampledToken
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler import Scheduler, SchedulerConfig
from xlaserve.models.attention import resolve_backend
from xlaserve.sharding.mesh import MODEL, make_mesh

logger = logging.getLogger(__name__)

FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}

# A prompt: text, token ids, or {"prompt": text} / {"prompt_token_ids": ids}.
PromptType = str | list[int] | dict


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer | None]
    metrics: RequestMetrics
    logprobs: list[list[PositionLogprobs]] = field(default_factory=list)
    cumulative_logprob: list[float] = field(default_factory=list)
    prompt_logprobs: dict[int, PositionLogprobs] = field(default_factory=dict)


class LLMEngine:
    """Drives one scheduler and one runner. Built from options with `from_engine_args`, or
    from parts (any runner with `execute`/`release`/`warmup`, e.g. a mock) with the constructor."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner,
        *,
        tokenizer,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        model_name: str = "",
        dtype: str = "",
    ):
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = scheduler.config.max_model_len
        self.model_name = model_name
        self.dtype = dtype
        self.runner.warmup()
        self.requests: dict[str, RequestState] = {}
        self._owners: dict[int, tuple[RequestState, int]] = {}  # seq_id -> (request, index)
        self._request_ids = itertools.count()
        self.num_steps = 0
        self.step_seconds = 0.0  # wall time inside step(), host and device

    @classmethod
    def from_engine_args(cls, args: EngineArgs, mesh: Mesh | None = None) -> "LLMEngine":
        """Loads the model, sizes the KV cache from the memory budget, compiles every bucket.

        mesh: the devices of this one replica (default: the first tensor_parallel_size devices
        when tensor_parallel_size > 1, else the default device).
        """
        if args.backend == "torch":
            from xlaserve.kernels_cuda.engine import build_torch_engine

            return build_torch_engine(cls, args, mesh)
        loaded, scheduler_config, runner = build_model_runner(args, mesh)
        c = loaded.config
        engine = cls(
            Scheduler(scheduler_config),
            runner,
            tokenizer=loaded.tokenizer,
            vocab_size=c.vocab_size,
            eos_token_ids=c.eos_token_ids,
            model_name=args.model,
            dtype=jax.numpy.dtype(loaded.dtype).name,
        )
        logger.info(
            "warm-up compiled %d graphs in %.1fs", runner.compiles.count, runner.warmup_seconds
        )
        return engine

    def shutdown(self) -> None:
        """Releases followers of a multi-host mesh (they exit their step loop)."""
        stop = getattr(getattr(self.runner, "steps", None), "stop_followers", None)
        if stop is not None:
            stop()

    # ---- requests -------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt_token_ids")
            return prompt, self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, list | tuple):
            return None, self._check_ids(prompt)
        raise ValueError(f"prompt must be a string, token ids or a dict, got {type(prompt)}")

    def _check_ids(self, ids) -> list[int]:
        if not isinstance(ids, list | tuple):
            raise ValueError(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}")
        if not ids:
            raise ValueError("prompt is empty (no prompt_token_ids)")
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(
                    f"prompt token id {t!r} at position {i} is outside the vocabulary "
                    f"[0, {self.vocab_size})"
                )
        return list(ids)

    def add_request(
        self,
        request_id: str | None,
        prompt: PromptType,
        params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> str:
        """Validates and queues a request; returns its id. Bad input raises ValueError."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params)}")
        text, ids = self.tokenize_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                "(room for at least one output token is needed)"
            )
        params.validate_for_model(self.vocab_size)
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = time.time() if arrival_time is None else arrival_time
        # Everything that can refuse the request runs before the scheduler takes it.
        detokenizers = [self._detokenizer(ids, params) for _ in range(params.n)]
        seqs = self.scheduler.add_request(
            request_id,
            ids,
            params,
            arrival_time=arrival,
            priority=priority,
            eos_token_ids=self.eos_token_ids,
        )
        state = RequestState(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            seqs=seqs,
            detokenizers=detokenizers,
            metrics=RequestMetrics(arrival_time=arrival),
            logprobs=[[] for _ in seqs],
            cumulative_logprob=[0.0 for _ in seqs],
        )
        self.requests[request_id] = state
        for i, seq in enumerate(seqs):
            self._owners[seq.seq_id] = (state, i)
        return request_id

    def _detokenizer(self, ids, params: SamplingParams) -> IncrementalDetokenizer | None:
        if not params.detokenize or self.tokenizer is None:
            if params.stop:
                raise ValueError("stop strings need detokenization (detokenize=True, a tokenizer)")
            return None
        return IncrementalDetokenizer(
            self.tokenizer,
            ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request at any point; its pages return to the pool."""
        for seq in self.scheduler.abort_request(request_id):
            self.runner.release(seq.seq_id)
        state = self.requests.get(request_id)
        if state is None:
            return None
        return self._finish_request(state)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules, runs and post-processes one batch; returns the requests that progressed."""
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        for seq in scheduled.preempted:
            self.runner.release(seq.seq_id)
        if not scheduled.scheduled:
            return []
        result = self.runner.execute(scheduled)
        tokens = {seq_id: s.token for seq_id, s in result.sampled.items()}
        self.scheduler.update_from_output(scheduled, tokens)
        outputs = self._postprocess(scheduled, result)
        self.num_steps += 1
        self.step_seconds += time.perf_counter() - start
        return outputs

    def _postprocess(self, scheduled, result) -> list[RequestOutput]:
        now = time.time()
        touched: dict[str, RequestState] = {}
        for item in scheduled.scheduled:
            state, _ = self._owners[item.seq.seq_id]
            state.metrics.first_scheduled_time = state.metrics.first_scheduled_time or now
        for seq_id, plp in result.prompt_logprobs.items():
            state, _ = self._owners[seq_id]
            for p in plp:
                state.prompt_logprobs[p.position] = self._position_logprobs(
                    p.token, p.logprob, p.top_logprobs
                )
        for seq_id, sampled in result.sampled.items():
            state, index = self._owners[seq_id]
            seq = state.seqs[index]
            state.metrics.first_token_time = state.metrics.first_token_time or now
            self._record_token(state, index, seq, sampled)
            touched[state.request_id] = state
        outputs = []
        for state in touched.values():
            if all(s.is_finished for s in state.seqs):
                outputs.append(self._finish_request(state))
            else:
                outputs.append(self.make_output(state))
        return outputs

    def _record_token(self, state: RequestState, index: int, seq: Sequence, s: SampledToken):
        if s.logprob is not None:
            state.logprobs[index].append(
                self._position_logprobs(s.token, s.logprob, s.top_logprobs)
            )
            state.cumulative_logprob[index] += s.logprob
        detok = state.detokenizers[index]
        if detok is None:
            return
        update = detok.append([s.token])
        if update.stop_str is not None:
            if seq.is_finished:  # the same token also ended it by length: the stop string wins
                seq.finish(RequestStatus.FINISHED_STOPPED, update.stop_str)
            else:
                self.scheduler.finish_sequence(seq, RequestStatus.FINISHED_STOPPED, update.stop_str)
        if seq.is_finished:
            detok.flush()
            self.runner.release(seq.seq_id)

    def _position_logprobs(self, token: int, logprob: float, top) -> PositionLogprobs:
        entry = {tid: Logprob(lp, rank + 1, self._decode_one(tid)) for rank, (tid, lp) in
                 enumerate(top)}  # fmt: skip
        if token not in entry:
            entry[token] = Logprob(logprob, None, self._decode_one(token))
        return entry

    def _decode_one(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    def _finish_request(self, state: RequestState) -> RequestOutput:
        state.metrics.finished_time = time.time()
        for seq in state.seqs:
            self._owners.pop(seq.seq_id, None)
            if not seq.is_finished:
                seq.finish(RequestStatus.FINISHED_ABORTED)
        self.requests.pop(state.request_id, None)
        return self.make_output(state)

    def make_output(self, state: RequestState) -> RequestOutput:
        completions = []
        for i, seq in enumerate(state.seqs):
            detok = state.detokenizers[i]
            want_lp = state.params.logprobs is not None
            completions.append(
                CompletionOutput(
                    index=i,
                    # Unfinished outputs never show text held back for a possible stop string.
                    text=""
                    if detok is None
                    else (detok.text if seq.is_finished else detok.released_text),
                    token_ids=list(seq.output_token_ids),
                    cumulative_logprob=state.cumulative_logprob[i] if want_lp else None,
                    logprobs=list(state.logprobs[i]) if want_lp else None,
                    finish_reason=FINISH_REASONS.get(seq.status),
                    stop_reason=seq.stop_reason,
                )
            )
        prompt_lp = None
        if state.params.prompt_logprobs is not None:
            # The first prompt token has no logprob (nothing precedes it), as in vLLM.
            prompt_lp = [None] + [
                state.prompt_logprobs.get(p) for p in range(1, len(state.prompt_token_ids))
            ]
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=prompt_lp,
            outputs=completions,
            finished=all(s.is_finished for s in state.seqs),
            metrics=state.metrics,
            num_cached_tokens=state.seqs[0].num_cached_prompt_tokens,
        )

    # ---- metrics ----------------------------------------------------------------------------
    def get_metrics(self) -> dict:
        bm = self.scheduler.block_manager
        return {
            "compiles": self.runner.compiles.count,
            "compiles_after_warmup": self.runner.compiles_after_warmup,
            "warmup_seconds": self.runner.warmup_seconds,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "kv_pages_total": self.scheduler.config.num_pages,
            "kv_pages_free": bm.num_free_pages,
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "steps": self.num_steps,
            "step_seconds": self.step_seconds,
            # From the first dispatch of a step to its sampled tokens on the host; the rest of
            # step_seconds is host work (scheduling, packing, detokenizing) the device waits on.
            "device_seconds": getattr(self.runner, "device_seconds", 0.0),
        }


def scheduler_config_for(args: EngineArgs, max_model_len: int, num_pages: int) -> SchedulerConfig:
    return SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.resolve_max_num_batched_tokens(),
        max_model_len=max_model_len,
        page_size=args.page_size,
        num_pages=num_pages,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        policy=args.scheduling_policy,
        max_waiting_requests=args.max_waiting_requests,
    )


def runner_config_for(args: EngineArgs, max_model_len: int, num_pages: int) -> RunnerConfig:
    return RunnerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.resolve_max_num_batched_tokens(),
        max_model_len=max_model_len,
        page_size=args.page_size,
        num_pages=num_pages,
        seed=args.seed,
        min_token_bucket=args.min_token_bucket,
        token_bucket_sizes=tuple(args.token_buckets) if args.token_buckets else None,
    )


def build_model_runner(args: EngineArgs, mesh: Mesh | None = None):
    """(loaded model, scheduler config, runner) for these options: the model on its mesh and a
    KV cache sized from the memory budget. Every process of a multi-host mesh builds the same."""
    enable_compilation_cache(args.compilation_cache_dir)
    resolve_backend(args.attention_backend)  # a ValueError naming the choices
    if mesh is None and (args.tensor_parallel_size > 1 or jax.process_count() > 1):
        mesh = make_mesh(args.tensor_parallel_size)
    loaded = load_model(
        args.model, load_format=args.load_format, dtype=args.dtype, seed=args.seed, mesh=mesh
    )
    loaded.model.attention_backend = args.attention_backend  # validated before loading
    on_cpu = jax.default_backend() == "cpu"
    if mesh is None and on_cpu:
        loaded.model.unstack_layers()  # separate per-layer buffers: see unstack_layers
    # XLA's CPU backend has no 16-bit float scatter: it would convert the whole cache to
    # float32 and back around every cache write, so the CPU keeps the cache in float32.
    kv_dtype = jax.numpy.float32 if on_cpu else loaded.dtype
    c = loaded.config
    max_model_len = args.resolve_max_model_len(c.max_position_embeddings)
    page_bytes = (c.num_layers * args.page_size * 2 * c.num_kv_heads * c.head_dim) * (
        jax.numpy.dtype(kv_dtype).itemsize
    )
    devices = jax.devices() if mesh is None else list(mesh.devices.flat)
    if mesh is not None:  # the cache is split over the KV heads when they divide
        page_bytes //= mesh.shape[MODEL] if c.num_kv_heads % mesh.shape[MODEL] == 0 else 1
    num_pages = kv_cache_pages(
        args, page_bytes=page_bytes, max_model_len=max_model_len, device=devices[0]
    )
    scheduler_config = scheduler_config_for(args, max_model_len, num_pages)
    runner = ModelRunner(
        loaded.model,
        runner_config_for(args, max_model_len, num_pages),
        kv_dtype=kv_dtype,
        mesh=mesh,
    )
    return loaded, scheduler_config, runner


def run_follower(args: EngineArgs) -> None:
    """A non-leader process of a multi-host mesh: same model and steps, no scheduling."""
    from xlaserve.sharding.distributed import follow

    _, _, runner = build_model_runner(args)
    follow(runner)
