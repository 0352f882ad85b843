"""Cumulative `RequestOutput`s -> what each sample added since the last message (for streams).

The engine's text of an unfinished sample only grows (text that could still turn out to start a
stop string is held back by the detokenizer), so a delta is simply the new suffix.
"""

from __future__ import annotations

from dataclasses import dataclass

from xlaserve.engine.outputs import PositionLogprobs, RequestOutput


@dataclass
class SampleDelta:
    index: int
    token_ids: list[int]  # new tokens
    text: str  # new text
    logprobs: list[PositionLogprobs] | None  # one entry per new token, when asked for
    finish_reason: str | None  # set in the sample's last delta
    stop_reason: int | str | None
    cumulative_logprob: float | None


class DeltaTracker:
    """Remembers how much of each sample was sent; `update` returns only what is new."""

    def __init__(self) -> None:
        self._sent_tokens: dict[int, int] = {}
        self._sent_chars: dict[int, int] = {}
        self._done: set[int] = set()

    def update(self, output: RequestOutput) -> list[SampleDelta]:
        deltas = []
        for c in output.outputs:
            if c.index in self._done:
                continue
            finished = c.finish_reason is not None
            sent_tokens = self._sent_tokens.get(c.index, 0)
            sent_chars = self._sent_chars.get(c.index, 0)
            end = len(c.text)
            new_tokens = c.token_ids[sent_tokens:]
            text = c.text[sent_chars:end]
            if not new_tokens and not text and not finished:
                continue
            self._sent_tokens[c.index] = len(c.token_ids)
            self._sent_chars[c.index] = end
            if finished:
                self._done.add(c.index)
            deltas.append(
                SampleDelta(
                    index=c.index,
                    token_ids=list(new_tokens),
                    text=text,
                    logprobs=None if c.logprobs is None else c.logprobs[sent_tokens:],
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    cumulative_logprob=c.cumulative_logprob,
                )
            )
        return deltas


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int

    @classmethod
    def of(cls, output: RequestOutput) -> Usage:
        return cls(
            prompt_tokens=len(output.prompt_token_ids),
            completion_tokens=sum(len(c.token_ids) for c in output.outputs),
            cached_prompt_tokens=output.num_cached_tokens,
        )

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_prompt_tokens + other.cached_prompt_tokens,
        )

    def openai(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_prompt_tokens},
        }


def ranked_top(position: PositionLogprobs, limit: int | None = None) -> list[tuple[int, object]]:
    """The top alternatives of a position, most likely first: [(token_id, Logprob)]."""
    top = sorted(
        ((tid, lp) for tid, lp in position.items() if lp.rank is not None),
        key=lambda item: item[1].rank,
    )
    return top if limit is None else top[:limit]
