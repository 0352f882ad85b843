"""When to draft: per-request back-off and an engine-wide cost check, from measured figures.

Device-free (the scheduler owns one). Two decisions, both from measurements:

- per request: an exponential moving average of its acceptance rate; below
  `backoff_acceptance` it stops drafting for a number of steps (doubling, up to
  `max_backoff_steps`), then drafts again and is measured anew;
- per step: how many drafts per sequence (0..k) maximise the tokens a step is expected to
  emit per second of step time. With acceptance rate a and j drafts a sequence emits
  (1 - a^(j+1)) / (1 - a) tokens per verification step. The step times are the runner's
  warm-up measurements (`update_costs`): the forward of the token bucket the step pads to,
  plus the sampler or the verifier of its sequence bucket. Drafts that still fit the token
  bucket plain decoding pads to cost only the verifier; drafts that spill into a bigger bucket
  must earn that too. Without measurements it drafts k.

Also the counters behind the `spec_decode_*` metrics.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from xlaserve.spec_decode.config import SpeculativeConfig

EMA_WEIGHT = 0.3  # weight of the newest observation in a request's acceptance average
PRIOR_ACCEPTANCE = 0.5  # a new request's assumed acceptance until the engine has measured one
FIRST_BACKOFF_STEPS = 4
MIN_GAIN = 0.03  # more drafts must promise this much more throughput (measurement noise)


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one verification emits (accepted drafts + 1), drafts accepted i.i.d."""
    a = min(max(acceptance, 0.0), 0.999)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass
class SpecDecodeStats:
    """Cumulative counters (vLLM's spec_decode metrics)."""

    num_drafts: int = 0  # verifications of at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]
    disabled_steps: int = 0  # steps in which the cost check turned drafting off

    @property
    def acceptance_rate(self) -> float | None:
        if not self.num_draft_tokens:
            return None
        return self.num_accepted_tokens / self.num_draft_tokens


@dataclass
class _RequestState:
    acceptance: float
    observations: int = 0
    backoff: int = 0  # steps of the current back-off (0: none yet)
    resume_at: int = 0  # step at which it drafts again


class SpecDecodePolicy:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.stats = SpecDecodeStats(accepted_per_position=[0] * self.k)
        self._requests: dict[int, _RequestState] = {}  # seq_id ->
        self._step = 0
        self._global_acceptance = PRIOR_ACCEPTANCE
        self._costs = None  # StepCosts from the runner
        self.batch_enabled = True
        self.draft_limit = self.k  # drafts per sequence this step (the cost check's choice)

    # ---- measurements ---------------------------------------------------------------------
    def update_costs(self, costs) -> None:
        """The runner's measured `StepCosts` (None: unmeasured)."""
        self._costs = costs

    def step_cost(self, num_decodes: int, drafts: int) -> float | None:
        """Seconds of a step of `num_decodes` sequences feeding `drafts` drafts each."""
        c = self._costs
        if c is None:
            return None
        forward = _at_least(c.forward, num_decodes * (1 + drafts))
        tail = _at_least(c.verify if drafts else c.sample, num_decodes)
        return None if forward is None or tail is None else forward + tail

    def observe(self, seq_id: int, num_drafted: int, num_accepted: int) -> None:
        """One verification of `num_drafted` drafts, `num_accepted` of them accepted."""
        if num_drafted <= 0:
            return
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += num_drafted
        s.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            s.accepted_per_position[j] += 1
        rate = num_accepted / num_drafted
        self._global_acceptance += EMA_WEIGHT * (rate - self._global_acceptance)
        state = self._state(seq_id)
        state.acceptance += EMA_WEIGHT * (rate - state.acceptance)
        state.observations += 1
        if (
            self.config.adaptive
            and state.observations >= 2
            and state.acceptance < self.config.backoff_acceptance
        ):
            state.backoff = min(max(FIRST_BACKOFF_STEPS, 2 * state.backoff),
                                self.config.max_backoff_steps)  # fmt: skip
            state.resume_at = self._step + state.backoff + 1  # off for `backoff` steps
            state.observations = 0  # measured anew when it resumes
            state.acceptance = self.config.backoff_acceptance  # a neutral start on resuming

    def forget(self, seq_id: int) -> None:
        self._requests.pop(seq_id, None)

    # ---- decisions --------------------------------------------------------------------------
    def begin_step(self, num_decodes: int) -> None:
        """Called once per schedule with the sequences that will decode: decides whether
        drafting pays at this batch size."""
        self._step += 1
        cap = self.config.disable_by_batch_size
        limit = self.k if cap is None or num_decodes < cap else 0
        if limit and self.config.adaptive and num_decodes > 0:
            limit = self._best_draft_count(num_decodes)
        if not limit:
            self.stats.disabled_steps += 1
        self.draft_limit = limit
        self.batch_enabled = limit > 0

    def wants_drafts(self, seq_id: int) -> bool:
        if not self.batch_enabled:
            return False
        state = self._requests.get(seq_id)
        return state is None or self._step >= state.resume_at

    def _best_draft_count(self, num_decodes: int) -> int:
        """Drafts per sequence (0..k) with the most expected tokens per measured second."""
        if self.step_cost(num_decodes, 0) is None:
            return self.k  # unmeasured: try it
        best, best_rate = 0, None
        for j in range(self.k + 1):
            cost = self.step_cost(num_decodes, j)
            if cost is None or cost <= 0:
                break
            rate = num_decodes * expected_tokens(self._global_acceptance, j) / cost
            if best_rate is None or rate > best_rate * (1.0 + MIN_GAIN):
                best, best_rate = j, rate
        return best

    def _state(self, seq_id: int) -> _RequestState:
        state = self._requests.get(seq_id)
        if state is None:
            state = self._requests[seq_id] = _RequestState(self._global_acceptance)
        return state


def _at_least(measured: dict[int, float], n: int) -> float | None:
    """The measurement at the smallest bucket >= n (None past the largest)."""
    sizes = sorted(measured)
    i = bisect.bisect_left(sizes, n)
    return measured[sizes[i]] if i < len(sizes) else None
