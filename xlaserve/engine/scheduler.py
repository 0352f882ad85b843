"""Token-budget continuous batching: chunked prefill, prefix caching, preemption, priority.

One `schedule()` builds one ragged batch: running sequences first (decodes, then the next chunk
of partial prefills), then waiting sequences admitted while the token budget, the sequence cap
and the page pool allow. It returns a plain-data `SchedulerOutput` (a diff against the previous
step, see scheduler_output.py); the runner samples a token for every sequence whose chunk ends
at its last known token, and the engine hands the tokens back through `update_from_output`.

Samples of one request (`n > 1`) share their prompt pages: sample 0 is scheduled alone; its
siblings wait until its prompt is computed, then take the prompt's full pages by refcount (from
the prefix cache, or, with prefix caching off, straight from sample 0's page table) and compute
only the rest, at least one token.

Fairness: while other requests wait, a request is admitted only up to its share of the sequence
slots (`max_num_seqs` // requests running or waiting, at least 1); slots left over then go to
waiting sequences in policy order, so nothing idles. A request's running sequences are never
preempted for fairness: a newcomer takes the next slot that frees. Under "priority" a request is
passed over only in favour of requests of the same priority.

Speculative decoding (with a `SpecDecodePolicy`): a decoding sequence with drafted tokens feeds
its last token plus the drafts (as many as the budget and its length limits allow); the runner
verifies them and the sequence advances by the accepted count only: rejected positions hold K/V
that later steps overwrite, and only committed tokens are ever hashed into the prefix cache. A
draft-model method also reserves `num_lookahead_tokens` slots past each step for the draft's
own K/V. Drafts and look-ahead are given up before anyone is preempted for room.

Preemption is by recomputation: the victim's pages are freed, `num_computed_tokens` drops to 0
and it waits again; when readmitted it recomputes prompt + outputs so far (prefix-cache hits
included) and continues decoding exactly where it stopped.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from xlaserve.engine.block_manager import BlockManager, Prefix
from xlaserve.engine.request import RequestStatus, Sequence
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler_output import CachedSequence, NewSequence, SchedulerOutput
from xlaserve.lora.scheduling import AdapterAdmission
from xlaserve.multimodal.placement import cut_before_image, new_encoder_features
from xlaserve.pooling.params import PoolingTask
from xlaserve.spec_decode.policy import SpecDecodePolicy

POLICIES = ("fcfs", "priority")


class QueueFullError(RuntimeError):
    """`add_request` refused: `max_waiting_requests` requests are already waiting."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    page_size: int
    num_pages: int
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs": arrival order; "priority": (priority, arrival) order
    max_waiting_requests: int | None = None
    num_lookahead_tokens: int = 0  # KV slots reserved past a step for a draft model's drafts
    # LoRA: distinct adapters among running sequences at most (the device slots); None: off.
    max_loras: int | None = None
    # Multimodal: image feature rows the vision encoder may produce per step (None: no limit).
    # A prefill chunk stops before an image that would exceed it (one image larger than the
    # whole budget still goes, alone, so nothing starves).
    max_encoder_features_per_step: int | None = None
    # Every layer's attention window, when all layers are windowed: pages wholly before a
    # sequence's window are released as it advances (BlockManager.release_outside_window).
    kv_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "num_pages"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("num_lookahead_tokens", self.num_lookahead_tokens, minimum=0)
        _check_int("max_model_len", self.max_model_len, minimum=2)
        if self.max_waiting_requests is not None:
            _check_int("max_waiting_requests", self.max_waiting_requests, minimum=1)
        if self.max_loras is not None:
            _check_int("max_loras", self.max_loras, minimum=1)
        if self.max_encoder_features_per_step is not None:
            _check_int("max_encoder_features_per_step", self.max_encoder_features_per_step,
                       minimum=1)  # fmt: skip
        for name in ("enable_prefix_caching", "enable_chunked_prefill"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        # A lone sequence of max_model_len tokens must always fit, or the scheduler could stall.
        min_pages = math.ceil(self.max_model_len / self.page_size)
        if self.num_pages < min_pages:
            raise ValueError(
                f"num_pages must be >= {min_pages} to hold one sequence of max_model_len "
                f"{self.max_model_len} in pages of {self.page_size}, got {self.num_pages}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens must be >= max_model_len ({self.max_model_len}) when "
                f"chunked prefill is off, got {self.max_num_batched_tokens}"
            )


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass
class _Request:
    seqs: list[Sequence]
    prompt_ready: bool = False  # sample 0's prompt is computed: siblings may start


class Scheduler:
    """Device-free continuous-batching scheduler. Not thread-safe: one engine thread owns it."""

    def __init__(self, config: SchedulerConfig, spec: SpecDecodePolicy | None = None) -> None:
        self.config = config
        self.spec = spec
        self.block_manager = BlockManager(
            config.num_pages, config.page_size, config.enable_prefix_caching
        )
        self.waiting: list[Sequence] = []  # read-only outside: admission order
        self.running: list[Sequence] = []  # read-only outside
        self._running_by_id: dict[int, Sequence] = {}
        self.num_preemptions = 0
        self._requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        # What the runner's batch holds of each sequence in it: (tokens, pages) sent so far.
        self._sent: dict[int, tuple[int, int]] = {}
        self._left_batch: set[int] = set()  # left the runner's batch since the last schedule()
        self._spec_tokens: dict[int, tuple[int, ...]] = {}  # this step's drafts
        self._propose: set[int] = set()  # sequences to draft for after this step

    # ---------------------------------------------------------------- requests

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        arrival_time: float,
        priority: int = 0,
        eos_token_ids: tuple[int, ...] = (),
        held: bool = False,
        lora=None,
        pooling: PoolingTask | None = None,
        mm_items: tuple = (),
    ) -> list[Sequence]:
        """Queues a request as `params.n` WAITING sequences and returns them. `held` ones wait
        without being scheduled until `release(request_id)`. `lora`: the LoRAAdapter it runs
        under (None: the base model). A `pooling` request (n == 1) needs no room for an output
        token."""
        max_len = self.config.max_model_len
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a str, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = _token_list("prompt_token_ids", prompt_token_ids)
        if not prompt:
            raise ValueError("prompt_token_ids must not be empty")
        whole = min(max_len, self.config.max_num_batched_tokens)  # processed in one step
        if pooling is not None and (params.n != 1 or len(prompt) > whole):
            raise ValueError(f"a pooling request has one sequence of at most {whole} tokens, "
                             f"got n={params.n} and {len(prompt)} tokens")  # fmt: skip
        if pooling is None and len(prompt) + 1 > max_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens leaves no room for an output token within "
                f"max_model_len {max_len} (at most {max_len - 1} prompt tokens)"
            )
        eos = tuple(_token_list("eos_token_ids", eos_token_ids))
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an int, got {priority!r}")
        if isinstance(arrival_time, bool) or not isinstance(arrival_time, int | float):
            raise ValueError(f"arrival_time must be a number, got {arrival_time!r}")
        limit = self.config.max_waiting_requests
        if limit is not None and len({s.request_id for s in self.waiting}) >= limit:
            raise QueueFullError(f"{limit} requests are already waiting (max_waiting_requests)")

        seqs = [
            Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                sample_index=i,
                prompt_token_ids=prompt,
                params=params,
                arrival_time=float(arrival_time),
                priority=priority,
                eos_token_ids=eos,
                max_model_len=max_len,
                held=held,
                lora=lora,
                pooling=pooling,
                mm_items=tuple(mm_items),
            )
            for i in range(params.n)
        ]
        self._requests[request_id] = _Request(seqs, prompt_ready=params.n == 1)
        for seq in seqs:
            self._enqueue(seq, preempted=False)
        return seqs

    def release(self, request_id: str) -> None:
        """Lets a held request's sequences be scheduled."""
        for seq in self._requests[request_id].seqs:
            seq.held = False

    def abort_request(self, request_id: str) -> list[Sequence]:
        """Ends every unfinished sequence of the request (FINISHED_ABORTED), frees their pages
        and returns them. Idempotent; an unknown id returns []."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return []
        aborted = [seq for seq in request.seqs if not seq.is_finished]
        for seq in aborted:
            seq.finish(RequestStatus.FINISHED_ABORTED)
            self._release(seq)
        return aborted

    def finish_sequence(
        self, seq: Sequence, status: RequestStatus, stop_reason: int | str | None = None
    ) -> None:
        """Ends `seq` for a reason found outside the scheduler (a stop string) and frees its
        pages. No-op if it already finished."""
        if seq.is_finished:
            return
        seq.finish(status, stop_reason)
        self._on_finished(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---------------------------------------------------------------- the step

    def schedule(self) -> SchedulerOutput:
        """Builds one step's batch under `max_num_batched_tokens` and `max_num_seqs`."""
        budget = self.config.max_num_batched_tokens
        scheduled: dict[int, tuple[Sequence, int]] = {}  # seq_id -> (seq, tokens this step)
        preempted: list[Sequence] = []
        self._spec_tokens = {}
        self._propose = set()
        self._encoder_left = self.config.max_encoder_features_per_step
        if self.spec is not None:
            self.spec.begin_step(sum(1 for s in self.running if not s.is_prefill))

        # Running sequences: decodes first, then partial prefills, each in policy order.
        order = sorted(self.running, key=lambda s: (s.is_prefill, self._policy_key(s)))
        for seq in order:
            if budget == 0:
                break
            if seq.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if seq.awaits_last_token:  # async scheduling: its last token is on its way
                continue
            num_new = self._encoder_cut(seq, seq.num_computed_tokens,
                                        min(seq.num_uncomputed_tokens, budget))  # fmt: skip
            if num_new == 0:
                continue  # its next image waits for encoder budget
            if num_new < seq.num_uncomputed_tokens and not self.config.enable_chunked_prefill:
                continue
            samples = num_new == seq.num_uncomputed_tokens
            drafts = self._schedulable_drafts(seq, budget - num_new) if samples else ()
            lookahead = self._lookahead(seq, num_new + len(drafts)) if samples else 0
            while not self.block_manager.can_append(seq, num_new + len(drafts) + max(lookahead, 0)):
                if drafts or lookahead > 0:  # give up speculation before preempting anyone
                    drafts, lookahead = (), -1
                    continue
                victim = max(self.running, key=self._policy_key)
                self.preempt(victim)
                preempted.append(victim)
                if victim.seq_id in scheduled:
                    budget += scheduled.pop(victim.seq_id)[1]
                if victim is seq:
                    break
            else:
                self.block_manager.append_slots(seq, num_new + len(drafts) + max(lookahead, 0))
                num_new += len(drafts)
                scheduled[seq.seq_id] = (seq, num_new)
                budget -= num_new
                if drafts:
                    self._spec_tokens[seq.seq_id] = drafts
                if samples and lookahead >= 0 and self._may_propose(seq):
                    self._propose.add(seq.seq_id)

        # Waiting sequences, unless this step already had to preempt (no room to grow): first
        # up to each request's fair share of the sequence slots, then in order into what is left.
        if not preempted:
            budget, stopped = self._admit(scheduled, budget, self._fair_share())
            if not stopped:
                self._admit(scheduled, budget, None)
        return self._output(scheduled.values(), preempted)

    def _fair_share(self) -> int:
        """Sequence slots one request may fill while other requests wait: max_num_seqs split
        evenly over the requests with sequences running or ready to run (at least 1)."""
        contenders = {s.request_id for s in self.running}
        contenders.update(s.request_id for s in self.waiting if not s.held)
        return max(1, self.config.max_num_seqs // max(1, len(contenders)))

    def _admit(self, scheduled: dict, budget: int, share: int | None) -> tuple[int, bool]:
        """Admits waiting sequences in policy order into `scheduled`. With `share`, a request
        already running `share` sequences is passed over, so that one request's many samples
        cannot take every slot while others wait (under "priority", only in favour of requests
        of equal priority). Returns the budget left and whether admission stopped for want of
        tokens, slots or pages (then nobody behind may go first)."""
        running = Counter(s.request_id for s in self.running)
        adapters = AdapterAdmission(self.config.max_loras, (s.lora_key for s in self.running))
        passed_over: int | None = None  # priority of the first request passed over
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                return budget, True
            if seq.held:
                continue
            if not adapters.may_admit(seq.lora_key):
                continue  # waits for an adapter slot (see xlaserve/lora/scheduling.py)
            if not self._requests[seq.request_id].prompt_ready and seq.sample_index > 0:
                continue  # a sibling waits for sample 0's prompt pages
            if share is not None:
                if (
                    passed_over is not None
                    and self.config.policy == "priority"
                    and seq.priority > passed_over
                ):
                    break
                if running[seq.request_id] >= share:
                    passed_over = seq.priority if passed_over is None else passed_over
                    continue
            prefix = self._computed_prefix(seq)
            num_new = seq.num_tokens - prefix[1]
            if num_new > budget:
                if not self.config.enable_chunked_prefill or seq.pooling is not None:
                    return budget, True  # pooling sequences are processed whole
                num_new = budget
            wanted, num_new = num_new, self._encoder_cut(seq, prefix[1], num_new)
            if num_new == 0 or (num_new < wanted and not self.config.enable_chunked_prefill):
                continue  # its image waits for encoder budget
            samples = prefix[1] + num_new == seq.num_tokens
            lookahead = self._lookahead(seq, prefix[1] + num_new) if samples else 0  # computed: 0
            if not self.block_manager.can_allocate(seq, num_new + lookahead, prefix):
                return budget, True
            self.block_manager.allocate(seq, num_new, prefix)
            if lookahead:
                self.block_manager.append_slots(seq, num_new + lookahead)
            if samples and self._may_propose(seq):
                self._propose.add(seq.seq_id)
            self.waiting.remove(seq)
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            self._running_by_id[seq.seq_id] = seq
            scheduled[seq.seq_id] = (seq, num_new)
            budget -= num_new
            running[seq.request_id] += 1
            adapters.admitted(seq.lora_key)
        return budget, False

    def _output(self, scheduled, preempted: list[Sequence]) -> SchedulerOutput:
        """The step as a diff against what the runner's batch already holds."""
        new_seqs, cached_seqs, num_scheduled = [], [], {}
        for seq, num_new in scheduled:
            pages = self.block_manager.page_ids(seq)
            tokens = seq.all_token_ids
            sent = self._sent.get(seq.seq_id)
            if sent is None:
                new_seqs.append(
                    NewSequence(
                        seq_id=seq.seq_id,
                        request_id=seq.request_id,
                        sample_index=seq.sample_index,
                        token_ids=tuple(tokens),
                        num_prompt_tokens=seq.num_prompt_tokens,
                        params=seq.params,
                        page_ids=tuple(pages),
                        num_computed_tokens=seq.num_computed_tokens,
                        lora=seq.lora,
                        pooling=seq.pooling,
                        mm_items=seq.mm_items,
                    )
                )
            else:
                cached_seqs.append(
                    CachedSequence(
                        seq_id=seq.seq_id,
                        new_token_ids=tuple(tokens[sent[0] :]),
                        new_page_ids=tuple(pages[sent[1] :]),
                        num_computed_tokens=seq.num_computed_tokens,
                    )
                )
            self._sent[seq.seq_id] = (len(tokens), len(pages))
            num_scheduled[seq.seq_id] = num_new
        left, self._left_batch = frozenset(self._left_batch), set()
        return SchedulerOutput(
            new_seqs=tuple(new_seqs),
            cached_seqs=tuple(cached_seqs),
            num_scheduled_tokens=num_scheduled,
            finished_seq_ids=left,
            preempted_seq_ids=tuple(s.seq_id for s in preempted),
            spec_token_ids=self._spec_tokens,
            propose_seq_ids=frozenset(self._propose),
        )

    def _encoder_cut(self, seq: Sequence, start: int, num_new: int) -> int:
        """num_new shortened to keep this step's image encoding within the encoder budget
        (0: nothing fits); takes what it keeps from the budget."""
        limit = self.config.max_encoder_features_per_step
        if not seq.mm_items or limit is None:
            return num_new
        left = max(self._encoder_left, 0)
        end = cut_before_image(seq.mm_items, start, start + num_new, left,
                               may_exceed=left == limit)  # fmt: skip
        self._encoder_left -= new_encoder_features(seq.mm_items, start, end)
        return end - start

    # ---------------------------------------------------------------- speculation

    def _schedulable_drafts(self, seq: Sequence, room: int) -> tuple[int, ...]:
        """The drafts to feed after `seq`'s last token: no more than the budget left, and none
        that could only be accepted past max_model_len or max_tokens."""
        if not seq.spec_token_ids or room <= 0:
            return ()
        limit = min(room, self.config.max_model_len - seq.num_tokens - 1, self.spec.draft_limit)
        if seq.params.max_tokens is not None:
            limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)
        return tuple(seq.spec_token_ids[: max(limit, 0)])

    def _lookahead(self, seq: Sequence, num_new: int) -> int:
        """Slots past this step's tokens a draft model writes while drafting for `seq`."""
        if not self.config.num_lookahead_tokens or not self._may_propose(seq):
            return 0
        end = seq.num_computed_tokens + num_new
        return max(0, min(self.config.num_lookahead_tokens, self.config.max_model_len - end))

    def _may_propose(self, seq: Sequence) -> bool:
        return (
            self.spec is not None
            and seq.params.structured_outputs is None  # its mask is for one position only
            and self.spec.wants_drafts(seq.seq_id)
        )

    def update_from_output(
        self,
        output: SchedulerOutput,
        sampled: dict[int, int],
        accepted: dict[int, list[int]] | None = None,
        drafts: dict[int, list[int]] | None = None,
        pooled: Collection[int] = (),
    ) -> list[Sequence]:
        """Applies one executed step: advances computed tokens, appends the sampled tokens
        (`sampled`: seq_id -> token for every sequence whose chunk reached its last known
        token), finishes the `pooled` sequences (their prompt is processed), caches newly full
        pages and frees finished sequences. Returns the sequences that finished in this step.
        Sequences aborted or finished since `schedule()` are skipped. Speculative decoding:
        `accepted` holds the drafts the runner accepted (they come before the sampled token),
        `drafts` the tokens drafted for the next step."""
        finished: list[Sequence] = []
        accepted = accepted or {}
        drafts = drafts or {}
        for seq_id, num_new in output.num_scheduled_tokens.items():
            seq = self._running_by_id.get(seq_id)
            if seq is None or seq.status is not RequestStatus.RUNNING:
                continue
            num_spec = len(output.spec_token_ids.get(seq_id, ()))
            seq.num_computed_tokens += num_new - num_spec
            assert seq.num_computed_tokens <= seq.num_tokens, "schedule/update out of step"
            if seq.num_computed_tokens == seq.num_tokens and seq_id in pooled:
                seq.finish(RequestStatus.FINISHED_STOPPED)
            elif seq.num_computed_tokens == seq.num_tokens:
                if seq_id not in sampled:
                    raise ValueError(f"no sampled token for sequence {seq_id}")
                accepted_ids = accepted.get(seq_id, ())
                if len(accepted_ids) > num_spec:
                    raise ValueError(f"sequence {seq_id}: {len(accepted_ids)} drafts accepted "
                                     f"of {num_spec} fed")  # fmt: skip
                for token in accepted_ids:  # their K/V were computed as drafts
                    if seq.is_finished:
                        break
                    seq.num_computed_tokens += 1
                    seq.append_token(token)
                if not seq.is_finished:
                    seq.append_token(sampled[seq_id])
                if self.spec is not None:
                    self.spec.observe(seq_id, num_spec, len(accepted_ids))
            seq.spec_token_ids = list(drafts.get(seq_id, ())) if not seq.is_finished else []
            self.block_manager.cache_full_pages(seq)
            if self.config.kv_window is not None:
                self.block_manager.release_outside_window(seq, self.config.kv_window)
            if seq.sample_index == 0 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                self._requests[seq.request_id].prompt_ready = True
            if seq.is_finished:
                self._on_finished(seq)
                finished.append(seq)
        return finished

    # ---------------------------------------------------------------- async scheduling

    def update_pending(self, output: SchedulerOutput) -> None:
        """Applies a step whose tokens are still being sampled (async scheduling): advances
        computed tokens and appends a pending token to every sequence that samples, so the
        next step can be scheduled before this one's tokens arrive (`resolve_token`)."""
        if output.spec_token_ids:
            raise ValueError("async scheduling does not take speculative drafts")
        for seq_id, num_new in output.num_scheduled_tokens.items():
            seq = self._running_by_id.get(seq_id)
            if seq is None or seq.status is not RequestStatus.RUNNING:
                continue
            seq.num_computed_tokens += num_new
            assert seq.num_computed_tokens <= seq.num_tokens, "schedule/update out of step"
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_pending()
            self.block_manager.cache_full_pages(seq)
            if self.config.kv_window is not None:
                self.block_manager.release_outside_window(seq, self.config.kv_window)
            if seq.sample_index == 0 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                self._requests[seq.request_id].prompt_ready = True

    def resolve_token(self, seq: Sequence, token: int) -> bool:
        """Gives `seq`'s oldest pending token its sampled id and applies the stop conditions;
        frees a sequence that stopped. False (and nothing changes) when the sequence ended
        while the token was on its way (aborted, or stopped by the token before it)."""
        if seq.is_finished or not seq.num_pending:
            return False
        seq.resolve_pending(token)
        if seq.is_finished:
            self._on_finished(seq)
        elif seq.status is RequestStatus.RUNNING:
            self.block_manager.cache_full_pages(seq)
        return True

    def get_sequence(self, seq_id: int) -> Sequence | None:
        """A running sequence by id (None once it left the running set)."""
        return self._running_by_id.get(seq_id)

    # ---------------------------------------------------------------- verbs

    def preempt(self, seq: Sequence) -> None:
        """Recompute-mode preemption: frees `seq`'s pages and puts it back in waiting."""
        self.running.remove(seq)
        del self._running_by_id[seq.seq_id]
        self._leave_batch(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        self._enqueue(seq, preempted=True)

    # ---------------------------------------------------------------- internals

    def _policy_key(self, seq: Sequence) -> tuple:
        """Sort key, most important first; the preemption victim is the max."""
        if self.config.policy == "priority":
            return (seq.priority, seq.arrival_time, seq.seq_id)
        return (seq.arrival_time, seq.seq_id)

    def _enqueue(self, seq: Sequence, *, preempted: bool) -> None:
        if self.config.policy == "priority":
            bisect.insort(self.waiting, seq, key=self._policy_key)
        elif preempted:
            self.waiting.insert(0, seq)
        else:
            self.waiting.append(seq)

    def _computed_prefix(self, seq: Sequence) -> Prefix:
        if seq.params.prompt_logprobs is not None and seq.sample_index == 0:
            return [], 0  # every prompt position must be computed to score it
        if seq.pooling is not None:
            return [], 0  # pooling reads the hidden states of every prompt token
        if self.block_manager.enable_prefix_caching:
            return self.block_manager.get_computed_prefix(seq)
        source = self._requests[seq.request_id].seqs[0]
        if seq is not source and source.status is RequestStatus.RUNNING:
            return self.block_manager.shared_prefix(seq, source)
        return [], 0

    def _on_finished(self, seq: Sequence) -> None:
        self._release(seq)
        request = self._requests.get(seq.request_id)
        if request is None:
            return
        if seq.sample_index == 0:  # it may finish before its siblings start
            request.prompt_ready = True
        if all(s.is_finished for s in request.seqs):
            del self._requests[seq.request_id]

    def _release(self, seq: Sequence) -> None:
        if self._running_by_id.pop(seq.seq_id, None) is not None:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._leave_batch(seq)
        self.block_manager.free(seq)
        seq.spec_token_ids = []
        if self.spec is not None:
            self.spec.forget(seq.seq_id)

    def _leave_batch(self, seq: Sequence) -> None:
        """The runner's batch drops `seq` at the next step (it re-enters whole if resumed)."""
        if self._sent.pop(seq.seq_id, None) is not None:
            self._left_batch.add(seq.seq_id)


def _token_list(name: str, ids: object) -> list[int]:
    if not isinstance(ids, list | tuple):
        raise ValueError(f"{name} must be a list of ints, got {type(ids).__name__}")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"{name} must hold ints >= 0, got {token!r}")
    return list(ids)
