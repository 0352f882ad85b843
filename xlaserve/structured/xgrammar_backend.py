"""The xgrammar backend: JSON schema, regex, choice and EBNF (GBNF) or Lark grammars.

A grammar is compiled ahead against the whole vocabulary (milliseconds for a small schema),
after which a row of the mask takes microseconds. `check` only parses the constraint (well
under a millisecond): xgrammar reports syntax errors and unknown types there.

Where xgrammar's defaults differ from the guidance backend, this follows guidance:
- `disable_any_whitespace` gives compact JSON (separators "," and ":"), not ", " and ": ".
- JSON schema keywords that xgrammar parses and then ignores, though they would restrict the
  output (`if`, `not`, `uniqueItems`, ...), are refused rather than dropped.
- `is_terminated()` is true as soon as nothing but EOS may follow, not only after EOS.
- A grammar without "::=" is read as Lark (`start:` rule), one with it as GBNF (`root ::=`).
Objects follow xgrammar's strict mode: properties a schema does not name are not generated.
`whitespace_pattern` is refused while the installed xgrammar cannot take one.
"""

from __future__ import annotations

import inspect
import json
import re

import numpy as np

from xlaserve.structured.params import StructuredOutputsParams, _invalid

# Restricting keywords that xgrammar 0.2 parses and then ignores (checked in the tests).
UNENFORCED_KEYWORDS = frozenset(
    "if then else not dependentRequired dependentSchemas propertyNames uniqueItems contains "
    "minContains maxContains".split()
)
# Where subschemas sit: a schema, a list of schemas, a name -> schema map.
_SCHEMA = (
    "items additionalItems additionalProperties unevaluatedProperties unevaluatedItems "
    "contains propertyNames not if then else".split()
)
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# xgrammar starts its messages with "[hh:mm:ss] /path/file.cc:123: ".
_LOG_PREFIX = re.compile(r"^\[[\d:.]+\] \S+:\d+: ")


def _reason(e: Exception) -> str:
    return _LOG_PREFIX.sub("", str(e).strip())


def unenforced_keywords(schema: object) -> set[str]:
    """The keywords in `schema` or its subschemas that xgrammar would not enforce."""
    found: set[str] = set()

    def visit(s: object) -> None:
        if isinstance(s, list):  # draft-4 tuple `items`
            for sub in s:
                visit(sub)
        if not isinstance(s, dict):
            return
        found.update(UNENFORCED_KEYWORDS & s.keys())
        for key, value in s.items():
            if key in _SCHEMA:
                visit(value)
            elif key in _SCHEMA_LISTS and isinstance(value, list):
                visit(value)
            elif key in _SCHEMA_MAPS and isinstance(value, dict):
                visit(list(value.values()))

    visit(schema)
    return found


class XGrammarMatcher:
    """One sequence's position in a compiled grammar."""

    def __init__(self, matcher, stop_row: np.ndarray, vocab_size: int) -> None:
        self._m = matcher
        self._stop_row = stop_row  # int32[W]: only the stop tokens allowed
        # xgrammar sets the bits past vocab_size in a partial last word: they must stay 0.
        self._last_word = np.int32((1 << vocab_size % 32) - 1) if vocab_size % 32 else None
        self._next: np.ndarray | None = None  # the current state's mask, when already computed
        self._error: str | None = None

    def _mask(self, row: np.ndarray) -> None:
        if self._m.is_terminated():  # xgrammar has no mask after EOS; like guidance, allow EOS
            row[:] = self._stop_row
        else:
            self._m.fill_next_token_bitmask(row[None])  # [1, W]: DLPack shares `row`'s memory
            if self._last_word is not None:
                row[-1] &= self._last_word

    def fill_bitmask(self, row: np.ndarray) -> None:
        if self._next is not None:
            row[:] = self._next
        else:
            self._mask(row)

    def accept(self, token: int) -> bool:
        if not self._m.accept_token(token):
            self._error = f"token {token} is not allowed by the grammar here"
            return False
        self._next = None
        return True

    def is_terminated(self) -> bool:
        if self._m.is_terminated():
            return True
        if not self._m.is_completed():  # EOS not allowed yet
            return False
        if self._next is None:  # kept for the next fill_bitmask: the state is unchanged
            self._next = np.empty_like(self._stop_row)
            self._mask(self._next)
        return not (self._next & ~self._stop_row).any()

    @property
    def error(self) -> str | None:
        return self._error


class XGrammarGrammar:
    def __init__(self, compiled, stop_row: np.ndarray, vocab_size: int) -> None:
        self._compiled, self._stop_row, self._vocab_size = compiled, stop_row, vocab_size

    def new_matcher(self) -> XGrammarMatcher:
        import xgrammar

        matcher = xgrammar.GrammarMatcher(self._compiled)
        return XGrammarMatcher(matcher, self._stop_row, self._vocab_size)


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, hf_tokenizer, *, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        import xgrammar

        self._xgr = xgrammar
        self._vocab_size = vocab_size
        # ~0.3 s for a 49k vocabulary: once per engine. Ids from len(tokenizer) up to
        # vocab_size (padding rows of the embedding) are never allowed.
        info = xgrammar.TokenizerInfo.from_huggingface(
            hf_tokenizer, vocab_size=vocab_size, stop_token_ids=list(eos_token_ids) or None
        )
        self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)  # ours caches
        self._stop_row = np.zeros((vocab_size + 31) // 32, np.int32)  # [W]
        for t in info.stop_token_ids:
            self._stop_row.view(np.uint32)[t // 32] |= np.uint32(1 << (t % 32))
        schema_options = inspect.signature(xgrammar.Grammar.from_json_schema).parameters
        self._has_whitespace_pattern = "whitespace_pattern" in schema_options

    def grammar(self, params: StructuredOutputsParams):
        """The parsed constraint (an `xgrammar.Grammar`); raises `InvalidRequestError`."""
        G = self._xgr.Grammar
        kind = params.kind
        what = kind
        if kind == "grammar":
            what = "grammar (GBNF)" if "::=" in params.grammar else "grammar (Lark)"
        try:
            if kind in ("json", "json_object"):
                options = self._json_options(params)
                return G.from_json_schema(params.schema_text, **options)
            if kind == "regex":
                return G.from_regex(params.regex)
            if kind == "choice":
                literals = (json.dumps(c, ensure_ascii=False) for c in params.choice)
                return G.from_ebnf("root ::= " + " | ".join(literals))
            if "::=" in params.grammar:
                return G.from_ebnf(params.grammar)
            return G.from_lark(params.grammar)
        except RuntimeError as e:  # xgrammar's parse errors
            raise _invalid(f"invalid {what}: {_reason(e)}") from None

    def _json_options(self, params: StructuredOutputsParams) -> dict:
        unenforced = unenforced_keywords(json.loads(params.schema_text))
        if unenforced:
            raise _invalid(
                f"json schema keyword(s) {sorted(unenforced)} are not supported by the "
                f"xgrammar backend"
            )
        options: dict = {"any_whitespace": not params.disable_any_whitespace}
        if params.disable_any_whitespace:
            options["separators"] = (",", ":")
        if params.whitespace_pattern is not None:
            if not self._has_whitespace_pattern:
                raise _invalid(
                    "whitespace_pattern is not supported by the xgrammar backend (use "
                    "disable_any_whitespace, or the guidance backend)"
                )
            options["whitespace_pattern"] = params.whitespace_pattern
        return options

    def fill_bitmasks(self, matchers: list[XGrammarMatcher], out: np.ndarray) -> None:
        for i, matcher in enumerate(matchers):  # each keeps its own end-of-grammar logic
            matcher.fill_bitmask(out[i])

    def check(self, params: StructuredOutputsParams) -> None:
        self.grammar(params)

    def compile(self, params: StructuredOutputsParams) -> XGrammarGrammar:
        try:
            compiled = self._compiler.compile_grammar(self.grammar(params))
        except RuntimeError as e:
            raise _invalid(f"the {params.kind} cannot be compiled: {_reason(e)}") from None
        return XGrammarGrammar(compiled, self._stop_row, self._vocab_size)
