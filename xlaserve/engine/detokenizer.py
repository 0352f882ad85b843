"""Incremental detokenization for streaming, with stop strings (like vLLM's).

Text is decoded over a sliding window of token ids (the offset technique of vLLM's
`detokenize_incrementally` and HF's TextStreamer): `_prefix` .. `_read` holds tokens whose text
was already produced, `_read` .. end the tokens not yet turned into text. Each step decodes the
window with and without the new tokens and takes the difference, so a token's text is shaped by
its left context (BPE merges, SentencePiece's leading "▁", a character split over several byte
tokens). Nothing is produced while the window's text ends in U+FFFD: the trailing bytes may be
an incomplete UTF-8 sequence that later byte tokens complete.

The first output tokens are decoded with the last prompt tokens as context, so a SentencePiece
output that starts with "▁Hi" streams " Hi" (as vLLM does), while `tokenizer.decode(outputs)`
alone would strip that space. For byte-level BPE (GPT-2, Llama 3, SmolLM2) the two agree.

Stop strings: text that could still turn out to be the start of a stop string is held back from
the deltas (at most `max(len(stop)) - 1` characters, and only the longest tail that is a prefix
of some stop string); `flush()` releases it when the request ends without a stop.

Limitation (shared with vLLM): text is never retracted, so a decoder whose output for earlier
tokens changes with later ones is followed only as far as it is prefix-stable. The one case met
in practice: `tokenizers`' ByteFallback decoder renders a whole run of byte tokens as one U+FFFD
per byte once any byte in the run is invalid, so a model that emits "é" as two valid byte tokens
and then a stray continuation byte streams "é" although the final decode reads "\ufffd" * 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Prompt tokens kept as left context for the first output tokens (vLLM uses 5 as well).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class DetokenizerUpdate:
    """What one `append` adds to the stream.

    delta: new text to send to the client (may be "").
    stop_str: the stop string that matched, if any; the request must then finish, and `delta`
        ends right before it (or right after it with `include_stop_str_in_output`).
    """

    delta: str
    stop_str: str | None = None


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into streamed text deltas.

    The concatenation of all deltas (including `flush()`'s) equals `text`, and for a request
    without stop strings whose outputs are decoded with the prompt as context, equals
    `tokenizer.decode(output_ids, skip_special_tokens=...)` for byte-level BPE tokenizers.
    The tokenizer is any `transformers` tokenizer (only `decode` is used).
    """

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        stop = list(stop or ())
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._backend_decode = backend_decode(tokenizer)
        self._stop = stop
        self._include_stop = include_stop_str_in_output
        max_stop = max((len(s) for s in stop), default=0)
        # With the stop string included in the output every character before the end of a
        # match is output anyway, so nothing needs holding back (vLLM does the same).
        self._max_holdback = 0 if include_stop_str_in_output else max(max_stop - 1, 0)
        self._tail_len = max(max_stop - 1, 0)

        # Token window: context ids [0, _read) already have text; [_read, end) do not yet.
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

        self._released: list[str] = []  # text already handed out in deltas
        self._tail = ""  # the last `_tail_len` released characters (stop strings may span them)
        self._held = ""  # decoded text held back: it may be the start of a stop string
        self._stop_str: str | None = None
        self._finished = False

    @property
    def text(self) -> str:
        """The output text so far: released plus held-back text, cut at a matched stop string.

        Tokens whose bytes do not yet form complete characters are not included until more
        tokens complete them (or `flush()` is called).
        """
        return "".join(self._released) + self._held

    @property
    def stop_str(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stop_str

    @property
    def is_finished(self) -> bool:
        """True after a stop string matched or `flush()` was called."""
        return self._finished

    def append(self, token_ids: Sequence[int]) -> DetokenizerUpdate:
        """Adds new output tokens (usually one) and returns the text they release."""
        if self._finished:
            raise RuntimeError(
                f"append({list(token_ids)}) after the detokenizer finished "
                f"(stop string {self._stop_str!r})"
            )
        self._ids.extend(token_ids)
        return self._advance(final=False)

    @property
    def released_text(self) -> str:
        """Text handed out in deltas so far (`text` without what is held back)."""
        return "".join(self._released)

    def flush(self) -> str:
        """Ends the stream and returns the text still held back.

        Call it when the request finishes for another reason than a stop string (eos, length,
        abort). Trailing bytes of an incomplete character are decoded as U+FFFD, as
        `tokenizer.decode` would. Returns "" after a stop string matched, or on a second call.
        """
        if self._finished:
            return ""
        update = self._advance(final=True)
        if update.stop_str is None:
            update = DetokenizerUpdate(update.delta + self._held)
            self._release(self._held)
            self._held = ""
        self._finished = True
        return update.delta

    def _advance(self, *, final: bool) -> DetokenizerUpdate:
        new_text = self._decode_new(final=final)
        if not new_text:
            return DetokenizerUpdate("")
        pending = self._held + new_text
        match = self._find_stop(self._tail + pending)
        if match is not None:
            stop_str, start = match
            end = start + len(stop_str) if self._include_stop else start
            cut = end - len(self._tail)
            # A match ends in the new text, and (held-back text being maximal) never starts in
            # text already released unless the stop string is to be output anyway.
            assert cut >= 0, (self._tail, pending, stop_str)
            delta = pending[:cut]
            self._release(delta)
            self._held = ""
            self._stop_str = stop_str
            self._finished = True
            return DetokenizerUpdate(delta, stop_str)
        keep = self._holdback_len(pending)
        delta = pending[: len(pending) - keep]
        self._held = pending[len(pending) - keep :]
        self._release(delta)
        return DetokenizerUpdate(delta)

    def _decode_new(self, *, final: bool) -> str:
        """Text of the tokens after `_read`, or "" while it may end inside a character."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text):
            return ""  # e.g. only skipped special tokens so far
        if full_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""
        new_text = full_text[len(prefix_text) :]
        # Slide the window: drop ids left of the new prefix, so it stays a few tokens long.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return new_text

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,  # it would rewrite already-streamed text
        )

    def _find_stop(self, region: str) -> tuple[str, int] | None:
        """The earliest stop string match in region (on a tie, the shorter one) and its start."""
        best: tuple[int, int, str] | None = None
        for s in self._stop:
            i = region.find(s)
            if i != -1 and (best is None or (i, len(s)) < best[:2]):
                best = (i, len(s), s)
        return None if best is None else (best[2], best[0])

    def _holdback_len(self, pending: str) -> int:
        """Length of the longest tail of pending that a stop string starts with (not all of it)."""
        for k in range(min(self._max_holdback, len(pending)), 0, -1):
            tail = pending[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def _release(self, delta: str) -> None:
        if delta:
            self._released.append(delta)
            if self._tail_len:
                self._tail = (self._tail + delta)[-self._tail_len :]


def backend_decode(tokenizer):
    """The `tokenizers` backend's `decode` where the `transformers` tokenizer's own decode is
    exactly that call plus argument handling (its `_decode` is the fast base class's, and we
    never ask for the clean-up): the two decodes per streamed token go straight to Rust,
    without transformers' Python wrapper (cProfile, SmolLM2 at batch 32 on a 2-core EPYC:
    a decode step's detokenization 1.16 -> 0.44 ms). None otherwise (slow tokenizers, or
    classes with their own `_decode`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import transformers

    fast_bases = [
        getattr(transformers, name, None)
        for name in ("TokenizersBackend", "PreTrainedTokenizerFast")
    ]
    own = getattr(type(tokenizer), "_decode", None)
    if not any(base is not None and own is base._decode for base in fast_bases):
        return None
    return backend.decode
