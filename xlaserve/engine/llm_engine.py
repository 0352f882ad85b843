"""The engine: add_request / step / abort_request over the scheduler, a runner and the
detokenizer. Assembled by `xlaserve.engine.builder.build_engine`, or from parts (any `Runner`,
e.g. the tests' mock) with the constructor."""

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field

from xlaserve.engine.detokenizer import IncrementalDetokenizer
from xlaserve.engine.intake import PromptType, RequestIntake, check_request_id
from xlaserve.engine.outputs import (
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from xlaserve.engine.request import RequestStatus, Sequence
from xlaserve.engine.runner_api import DeviceInfo, Runner, SampledToken
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler import Scheduler
from xlaserve.engine.scheduler_output import SchedulerOutput
from xlaserve.errors import InvalidRequestError
from xlaserve.lora.manager import AdapterInfo, LoRAManager
from xlaserve.lora.request import LoRARequest
from xlaserve.pooling.model_config import PoolerConfig
from xlaserve.pooling.outputs import PoolingOutput, PoolingRequestOutput
from xlaserve.pooling.params import PoolingTask
from xlaserve.structured.manager import PendingBitmasks, StructuredOutputManager

logger = logging.getLogger(__name__)
GRAMMAR_WAIT_S = 0.05  # how long an idle step waits for a compiling grammar
# A grammar submitted this recently may delay the step this long to join it (most compile in
# a few milliseconds; a step takes tens).
GRAMMAR_GRACE_S = 0.01

FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


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
    error: str | None = None
    pooling: PoolingTask | None = None  # a pooling request: one pooled output, no tokens


class LLMEngine:
    """Drives one scheduler and one runner (see `xlaserve.engine.runner_api.Runner`)."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: Runner,
        *,
        tokenizer,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        model_name: str = "",
        dtype: str = "",
        structured: StructuredOutputManager | None = None,
        lora: LoRAManager | None = None,
        pooler: PoolerConfig | None = None,
        async_scheduling: bool = False,
        image_processor=None,
        media_policy=None,
    ):
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = scheduler.config.max_model_len
        self.model_name = model_name
        self.dtype = dtype
        self.structured = structured
        self.lora = lora  # LoRA adapters by name (None: LoRA is off)
        self.pooler = pooler  # a pooling model's defaults; None: a generative engine
        self.intake = RequestIntake(
            tokenizer,
            vocab_size=vocab_size,
            max_model_len=self.max_model_len,
            check_structured=None if structured is None else structured.check,
            pooler=pooler,
            image_processor=image_processor,
            media_policy=media_policy,
        )
        self.runner.warmup()
        if scheduler.spec is not None:  # how many drafts pay is decided on measured costs
            scheduler.spec.update_costs(self.runner.stats().step_costs)
        self.requests: dict[str, RequestState] = {}
        self._owners: dict[int, tuple[RequestState, int]] = {}  # seq_id -> (request, index)
        self._request_ids = itertools.count()
        self.num_steps = 0
        self.step_seconds = 0.0  # wall time inside step(), host and device
        # Async scheduling: the host schedules and packs step N+1 while the device runs step
        # N; N's tokens are applied after N+1 is dispatched (see `_step_async`).
        self.async_scheduling = bool(async_scheduling) and getattr(runner, "supports_async", False)
        self._in_flight = None  # (SchedulerOutput, the runner's in-flight step) or None

    def shutdown(self) -> None:
        """Releases what the runner holds beyond this process (multi-host followers)."""
        self.runner.shutdown()
        if self.structured is not None:
            self.structured.shutdown()

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str | None,
        prompt: PromptType,
        params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        add_special_tokens: bool = True,
        check_length: bool = False,
        lora_request: LoRARequest | None = None,
    ) -> str:
        """Validates and queues a request; returns its id. Bad input raises
        `InvalidRequestError` (a ValueError) naming the field. `lora_request` runs it under
        a LoRA adapter (loaded on first use)."""
        if request_id is None:
            request_id = str(next(self._request_ids))
        check_request_id(request_id, self.requests)
        request = self.intake.process(
            request_id,
            prompt,
            params,
            arrival_time=time.time() if arrival_time is None else arrival_time,
            priority=priority,
            add_special_tokens=add_special_tokens,
            check_length=check_length,
        )
        ids, params = request.prompt_token_ids, request.params
        adapter = None if lora_request is None else self._adapter_for(lora_request)
        detokenizers = [self._detokenizer(ids, params) for _ in range(params.n)]
        seqs = self.scheduler.add_request(
            request.request_id,
            ids,
            params,
            arrival_time=request.arrival_time,
            priority=request.priority,
            eos_token_ids=self.eos_token_ids,
            held=params.structured_outputs is not None,  # until its grammar is compiled
            lora=adapter,
            pooling=request.pooling,
            mm_items=request.mm_items,
        )
        if params.structured_outputs is not None:
            self.structured.submit(
                request.request_id, params.structured_outputs, [s.seq_id for s in seqs]
            )
        state = RequestState(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=ids,
            params=params,
            seqs=seqs,
            detokenizers=detokenizers,
            metrics=RequestMetrics(arrival_time=request.arrival_time),
            logprobs=[[] for _ in seqs],
            cumulative_logprob=[0.0 for _ in seqs],
            pooling=request.pooling,
        )
        self.requests[request.request_id] = state
        for i, seq in enumerate(seqs):
            self._owners[seq.seq_id] = (state, i)
        return request.request_id

    # ---- LoRA adapters --------------------------------------------------------------------
    def _adapter_for(self, lora_request: LoRARequest):
        if self.lora is None:
            raise InvalidRequestError(
                "lora_request", "LoRA adapters are not enabled (start with enable_lora=True)"
            )
        return self.lora.resolve(lora_request)

    def add_lora(self, lora_request: LoRARequest) -> AdapterInfo:
        """Loads and registers an adapter; a name already loaded is refused."""
        if self.lora is None:
            self._adapter_for(lora_request)  # raises: LoRA is off
        adapter = self.lora.add(lora_request)
        return next(a for a in self.lora.list_adapters() if a.name == adapter.name)

    def remove_lora(self, lora_name: str) -> None:
        """Unregisters an adapter; requests already running under it finish under it."""
        if self.lora is None:
            raise InvalidRequestError("lora_name", "LoRA adapters are not enabled")
        self.lora.remove(lora_name)

    def list_loras(self) -> list[AdapterInfo]:
        return [] if self.lora is None else self.lora.list_adapters()

    def _detokenizer(self, ids, params: SamplingParams) -> IncrementalDetokenizer | None:
        if not params.detokenize or self.tokenizer is None:
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
        self.scheduler.abort_request(request_id)
        state = self.requests.get(request_id)
        if state is None:
            return None
        return self._finish_request(state)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules, runs and post-processes one batch; returns the requests that progressed.

        With async scheduling, the batch dispatched here runs on the device while the host
        applies the previous batch's tokens; its own tokens are applied by the next call.
        Steps that need their tokens on the host first (structured outputs) run one at a time.
        """
        start = time.perf_counter()
        if self.async_scheduling and not self._needs_sync_step():
            outputs = self._step_async()
        else:
            outputs = self._resolve_in_flight() + self._step_sync()
        self.num_steps += 1
        self.step_seconds += time.perf_counter() - start
        return outputs

    def _needs_sync_step(self) -> bool:
        """A structured-output request needs each token on the host before its next mask."""
        return self.structured is not None and any(
            state.params.structured_outputs is not None for state in self.requests.values()
        )

    def _step_async(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        flight = None
        if not scheduled.is_empty:
            flight = self.runner.dispatch(scheduled)
            self.scheduler.update_pending(scheduled)  # its tokens are pending until collected
            now = time.time()
            for seq_id in scheduled.num_scheduled_tokens:
                metrics = self._owners[seq_id][0].metrics
                metrics.first_scheduled_time = metrics.first_scheduled_time or now
        elif scheduled.finished_seq_ids:
            self.runner.execute(scheduled)  # an empty step only drops finished sequences
        outputs = self._resolve_in_flight()
        if flight is not None:
            self._in_flight = (scheduled, flight)
        return outputs

    def _resolve_in_flight(self) -> list[RequestOutput]:
        """Applies the tokens of the step in flight (none: nothing to do)."""
        if self._in_flight is None:
            return []
        scheduled, flight = self._in_flight
        self._in_flight = None
        result = self.runner.collect(flight)
        now = time.time()
        touched = self._record_prompt_logprobs(result)
        for seq_id, sampled in result.sampled.items():
            owner = self._owners.get(seq_id)
            if owner is None:  # finished and reported meanwhile
                continue
            state, index = owner
            seq = state.seqs[index]
            if not self.scheduler.resolve_token(seq, sampled.token):
                continue  # aborted or stopped while the token was on its way
            state.metrics.first_token_time = state.metrics.first_token_time or now
            self._record_token(state, index, seq, sampled)
            touched[state.request_id] = state
        return self._outputs(touched)

    def _outputs(self, touched: dict[str, "RequestState"]) -> list[RequestOutput]:
        outputs = []
        for state in touched.values():
            if all(s.is_finished for s in state.seqs):
                outputs.append(self._finish_request(state))
            else:
                outputs.append(self.make_output(state))
        return outputs

    def _step_sync(self) -> list[RequestOutput]:
        failed = self._poll_grammars() if self.structured is not None else []
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty and not scheduled.finished_seq_ids:
            if self.structured is not None and self.structured.has_pending():
                self.structured.wait(GRAMMAR_WAIT_S)  # only held requests: wait, don't spin
            return failed
        if self.structured is not None:
            scheduled = self._with_bitmasks(scheduled)
        result = self.runner.execute(scheduled)  # an empty step only drops finished sequences
        if isinstance(scheduled.token_bitmasks, PendingBitmasks):
            scheduled.token_bitmasks.result()  # the mask thread is done with the matchers
        tokens = {seq_id: s.token for seq_id, s in result.sampled.items()}
        outputs_before = {seq_id: self._seq(seq_id).num_output_tokens for seq_id in tokens}
        accepted = {seq_id: [t.token for t in ts] for seq_id, ts in result.accepted.items()}
        self.scheduler.update_from_output(
            scheduled, tokens, accepted, result.drafts, pooled=result.pooled
        )
        outputs = failed + self._postprocess(scheduled, result, outputs_before)
        outputs += [self._pooled_output(seq_id, data) for seq_id, data in result.pooled.items()]
        return outputs

    def _seq(self, seq_id: int) -> Sequence:
        state, index = self._owners[seq_id]
        return state.seqs[index]

    def _record_prompt_logprobs(self, result) -> dict[str, "RequestState"]:
        """Stores a step's prompt logprobs; returns the requests they belong to."""
        touched: dict[str, RequestState] = {}
        for seq_id, plp in result.prompt_logprobs.items():
            owner = self._owners.get(seq_id)
            if owner is None:
                continue
            state = owner[0]
            for p in plp:
                state.prompt_logprobs[p.position] = self._position_logprobs(
                    p.token, p.logprob, p.top_logprobs
                )
        return touched

    def _postprocess(self, scheduled, result, outputs_before) -> list[RequestOutput]:
        now = time.time()
        for seq_id in scheduled.num_scheduled_tokens:
            state, _ = self._owners[seq_id]
            state.metrics.first_scheduled_time = state.metrics.first_scheduled_time or now
        touched = self._record_prompt_logprobs(result)
        for seq_id, sampled in result.sampled.items():
            state, index = self._owners[seq_id]
            seq = state.seqs[index]
            state.metrics.first_token_time = state.metrics.first_token_time or now
            # Several tokens when drafts were accepted; the scheduler appended them up to the
            # first that ended the sequence.
            before = outputs_before[seq_id]
            emitted = (result.accepted.get(seq_id, []) + [sampled])[: seq.num_output_tokens
                                                                    - before]  # fmt: skip
            for i, token in enumerate(emitted):
                last = i + 1 == len(emitted)
                if self._record_token(state, index, seq, token, last) and not last:
                    seq.truncate_outputs(before + i + 1)  # a stop string ended it early
                    break
            touched[state.request_id] = state
        return self._outputs(touched)

    def _pooled_output(self, seq_id: int, data) -> PoolingRequestOutput:
        """A pooling request is done once its prompt is processed."""
        state, _ = self._owners.pop(seq_id)
        self.requests.pop(state.request_id, None)
        state.metrics.first_token_time = state.metrics.finished_time = time.time()
        return PoolingRequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=PoolingOutput(data),
            task=state.pooling.task,
            metrics=state.metrics,
        )

    # ---- structured outputs ---------------------------------------------------------------
    def _poll_grammars(self) -> list[RequestOutput]:
        """Releases requests whose grammar compiled; fails those whose compile failed."""
        ready, failed = self.structured.poll(GRAMMAR_GRACE_S)
        for request_id in ready:
            self.scheduler.release(request_id)
        outputs = []
        for request_id, error in failed:
            state = self.requests.get(request_id)
            if state is None:
                continue
            logger.warning("request %s failed: %s", request_id, error)
            self.scheduler.abort_request(request_id)
            state.error = error
            outputs.append(self._finish_request(state))
        return outputs

    def _with_bitmasks(self, out: SchedulerOutput) -> SchedulerOutput:
        """The step plus the allowed-token rows of constrained sequences that sample in it."""
        sampling = []
        for seq_id, num_new in out.num_scheduled_tokens.items():
            if self.structured.owns(seq_id):
                state, index = self._owners[seq_id]
                seq = state.seqs[index]
                if seq.num_computed_tokens + num_new == seq.num_tokens:
                    sampling.append(seq_id)
        if not sampling:
            return out
        # Filled on the mask thread while the runner packs and dispatches the forward pass.
        return dataclasses.replace(out, token_bitmasks=self.structured.bitmasks_async(sampling))

    def _advance_grammar(self, seq: Sequence, token: int) -> None:
        """Moves the sequence's matcher past `token`; a complete constraint ends the sequence."""
        if not self.structured.accept(seq.seq_id, token):
            logger.warning("sequence %d: token %d breaks its constraint", seq.seq_id, token)
        elif not self.structured.is_terminated(seq.seq_id):
            return
        if not seq.is_finished:
            self.scheduler.finish_sequence(seq, RequestStatus.FINISHED_STOPPED)

    def _record_token(
        self, state: RequestState, index: int, seq: Sequence, s: SampledToken, last: bool = True
    ) -> bool:
        """Records one emitted token (`last`: the step's last for this sequence); True if a
        stop string ended the sequence at it."""
        if self.structured is not None and self.structured.owns(seq.seq_id):
            self._advance_grammar(seq, s.token)
        if s.logprob is not None:
            state.logprobs[index].append(
                self._position_logprobs(s.token, s.logprob, s.top_logprobs)
            )
            state.cumulative_logprob[index] += s.logprob
        detok = state.detokenizers[index]
        if detok is None:
            return False
        update = detok.append([s.token])
        if update.stop_str is not None:
            if seq.is_finished:  # the same token also ended it by length: the stop string wins
                seq.finish(RequestStatus.FINISHED_STOPPED, update.stop_str)
            else:
                self.scheduler.finish_sequence(seq, RequestStatus.FINISHED_STOPPED, update.stop_str)
        if seq.is_finished and (last or update.stop_str is not None):
            detok.flush()
        return update.stop_str is not None

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
        if self.structured is not None:
            self.structured.cancel(state.request_id)
        for seq in state.seqs:
            self._owners.pop(seq.seq_id, None)
            if self.structured is not None:
                self.structured.free(seq.seq_id)
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
                    token_ids=list(seq.resolved_output_token_ids),
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
            error=state.error,
        )

    # ---- facts and metrics ------------------------------------------------------------------
    def device_info(self) -> DeviceInfo:
        return self.runner.device_info()

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.config.max_num_seqs

    @property
    def structured_outputs_backend(self) -> str | None:
        """The grammar backend's name ("guidance", "xgrammar"); None: no structured outputs."""
        return None if self.structured is None else self.structured.backend_name

    @property
    def page_size(self) -> int:
        return self.scheduler.config.page_size

    def get_metrics(self) -> dict:
        bm = self.scheduler.block_manager
        stats = self.runner.stats()
        return {
            "compiles": stats.compiles,
            "compiles_after_warmup": stats.compiles_after_warmup,
            "warmup_seconds": stats.warmup_seconds,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "kv_pages_total": self.scheduler.config.num_pages,
            "kv_pages_free": bm.num_free_pages,
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "steps": self.num_steps,
            "step_seconds": self.step_seconds,
            # The part of step_seconds spent waiting for the device's sampled tokens; the rest
            # is host work (scheduling, packing, detokenizing). With async scheduling the host
            # works while the device computes, so this is what the device adds to a step.
            "device_seconds": stats.wait_seconds,
            **self._grammar_metrics(),
            **self._spec_decode_metrics(stats),
        }

    def _spec_decode_metrics(self, runner_stats) -> dict:
        if self.scheduler.spec is None:
            return {}
        s = self.scheduler.spec.stats
        return {
            "spec_decode_num_drafts": s.num_drafts,
            "spec_decode_num_draft_tokens": s.num_draft_tokens,
            "spec_decode_num_accepted_tokens": s.num_accepted_tokens,
            "spec_decode_acceptance_rate": s.acceptance_rate,
            "spec_decode_accepted_per_position": list(s.accepted_per_position),
            "spec_decode_disabled_steps": s.disabled_steps,
            "spec_decode_propose_seconds": runner_stats.propose_seconds,
        }

    def _grammar_metrics(self) -> dict:
        if self.structured is None:
            return {}
        g = self.structured.stats
        return {
            "grammar_compiles": g.compiles,
            "grammar_cache_hits": g.cache_hits,
            "grammar_compile_seconds": g.compile_seconds,
            "grammar_failures": g.failures,
            "grammar_bitmask_seconds": g.bitmask_seconds,
            "grammar_bitmask_wait_seconds": g.bitmask_wait_seconds,
        }
