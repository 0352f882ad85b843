"""The llguidance backend (the default): JSON schema, regex, choice and Lark/GBNF grammars.

Grammars are built lazily per parser state, so compiling is cheap and masks are computed on
demand (about a millisecond per row); the tokenizer trie is built once per engine.
"""

from __future__ import annotations

import json

import numpy as np

from xlaserve.structured.params import StructuredOutputsParams, _invalid

# Token masks may take this long per row before llguidance stops the request with an error
# rather than stall the engine (its lexer "fuel").
STEP_LEXER_FUEL = 1_000_000


class GuidanceMatcher:
    def __init__(self, matcher) -> None:
        self._m = matcher

    def fill_bitmask(self, row: np.ndarray) -> None:
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token: int) -> bool:
        return self._m.consume_token(token)

    def is_terminated(self) -> bool:
        return self._m.is_stopped()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


class GuidanceGrammar:
    def __init__(self, tokenizer, grammar: str, limits) -> None:
        self._tokenizer, self._grammar, self._limits = tokenizer, grammar, limits

    def new_matcher(self) -> GuidanceMatcher:
        import llguidance

        matcher = llguidance.LLMatcher(
            self._tokenizer, self._grammar, log_level=0, limits=self._limits
        )
        if matcher.is_error():
            raise _invalid(f"the grammar cannot be used: {matcher.get_error()}")
        return GuidanceMatcher(matcher)


class GuidanceBackend:
    name = "guidance"

    def __init__(self, hf_tokenizer, *, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        # ~0.6 s for a 49k vocabulary: once per engine.
        self._tokenizer = llguidance.hf.from_tokenizer(
            hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None
        )
        self._limits = llguidance.LLParserLimits(step_lexer_fuel=STEP_LEXER_FUEL)
        # Fills many rows at once on llguidance's own threads (GIL released).
        self._executor = llguidance.LLExecutor()

    def grammar_text(self, params: StructuredOutputsParams) -> str:
        """The llguidance grammar of a constraint (not yet checked)."""
        M = self._llg.LLMatcher
        kind = params.kind
        if kind in ("json", "json_object"):
            options: dict = {"whitespace_flexible": not params.disable_any_whitespace}
            if params.whitespace_pattern is not None:
                options["whitespace_pattern"] = params.whitespace_pattern
            return M.grammar_from_json_schema(params.schema_text, defaults=options)
        if kind == "regex":
            return M.grammar_from_regex(params.regex)
        if kind == "choice":
            return M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
        try:
            return self._llg.grammar_from("grammar", params.grammar)  # Lark, or GBNF converted
        except ValueError as e:
            raise _invalid(f"grammar: {e}") from None

    def fill_bitmasks(self, matchers: list[GuidanceMatcher], out: np.ndarray) -> None:
        if len(matchers) == 1:
            matchers[0].fill_bitmask(out[0])
            return
        assert out.dtype == np.int32 and out.flags["C_CONTIGUOUS"], "masks: int32, contiguous"
        pairs = [(m._m, i) for i, m in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(pairs, out.ctypes.data, out.shape[1] * 4, len(out))

    def check(self, params: StructuredOutputsParams) -> None:
        error = self._llg.LLMatcher.validate_grammar(self.grammar_text(params), self._tokenizer)
        if error:
            raise _invalid(f"invalid {params.kind}: {error.strip()}")

    def compile(self, params: StructuredOutputsParams) -> GuidanceGrammar:
        grammar = GuidanceGrammar(self._tokenizer, self.grammar_text(params), self._limits)
        grammar.new_matcher()  # builds and checks it once, off the engine thread
        return grammar
