"""Both grammar backends on the bundled SmolLM2 tokenizer: known-valid texts walk token by token
through the mask, wrong tokens are masked out, bad constraints are refused.

Contract asserted for both: every fill shows EOS allowed exactly when the grammar may end, and
`is_terminated()` is true exactly when nothing but EOS is allowed (so also after EOS).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from xlaserve.errors import InvalidRequestError
from xlaserve.structured.backend import bitmask_width
from xlaserve.structured.params import StructuredOutputsParams as P

VOCAB = 49152  # SmolLM2's tokenizer and model vocabulary
EOS = 2
PADDED_VOCAB = VOCAB + 40  # a model whose embedding has rows past the tokenizer's ids

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
# One arithmetic grammar in each dialect; both backends read both.
GBNF = """root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")"
"""
LARK = """start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: /[0-9]+/ | "(" expr ")"
"""


def _backend(name: str, tokenizer, vocab_size: int):
    if name == "guidance":
        from xlaserve.structured.guidance import GuidanceBackend as Backend
    else:
        from xlaserve.structured.xgrammar_backend import XGrammarBackend as Backend
    return Backend(tokenizer, vocab_size=vocab_size, eos_token_ids=(EOS,))


@pytest.fixture(scope="module")
def tokenizer():
    from xlaserve.checkpoints.presets import resolve_bundled
    from xlaserve.checkpoints.tokenizer import load_tokenizer

    return load_tokenizer(resolve_bundled("smollm2-135m-instruct"))


@pytest.fixture(scope="module", params=["guidance", "xgrammar"])
def backend(request, tokenizer):
    return _backend(request.param, tokenizer, VOCAB)


@pytest.fixture(scope="module", params=["guidance", "xgrammar"])
def padded_backend(request, tokenizer):
    return _backend(request.param, tokenizer, PADDED_VOCAB)


def allowed(matcher, vocab_size: int = VOCAB) -> np.ndarray:
    """bool[V] from a freshly filled row (pre-set to all ones: stale bits would show)."""
    row = np.full(bitmask_width(vocab_size), -1, np.int32)  # [W]
    matcher.fill_bitmask(row)
    bits = np.unpackbits(row.view(np.uint8), bitorder="little").astype(bool)  # [32 W]
    assert not bits[vocab_size:].any(), "bits past the vocabulary"
    return bits[:vocab_size]


def assert_terminated_iff_only_eos(matcher, mask: np.ndarray) -> None:
    only_eos = mask[EOS] and mask.sum() == 1
    assert matcher.is_terminated() == only_eos


def walk(backend, tokenizer, params: P, text: str):
    """Accepts `text` token by token (each allowed first), then EOS; returns the matcher."""
    backend.check(params)
    matcher = backend.compile(params).new_matcher()
    tokens = tokenizer.encode(text, add_special_tokens=False)
    for i, token in enumerate(tokens):
        mask = allowed(matcher)
        assert mask[token], f"token {i} ({tokenizer.decode([token])!r}) of {text!r} masked"
        assert_terminated_iff_only_eos(matcher, mask)
        assert matcher.accept(token), matcher.error
    mask = allowed(matcher)
    assert mask[EOS], f"EOS not allowed after {text!r}"
    assert_terminated_iff_only_eos(matcher, mask)
    assert matcher.accept(EOS), matcher.error
    assert matcher.is_terminated()
    assert np.flatnonzero(allowed(matcher)).tolist() == [EOS]
    assert matcher.error is None
    return matcher


def first_token(tokenizer, text: str) -> int:
    return tokenizer.encode(text, add_special_tokens=False)[0]


def test_json_schema(backend, tokenizer):
    walk(backend, tokenizer, P(json=SCHEMA), '{"name": "Ada", "age": 36}')
    walk(backend, tokenizer, P(json=json.dumps(SCHEMA)), '{"name":"Ada","age":-7}')


def test_json_schema_masks_what_does_not_fit(backend, tokenizer):
    matcher = backend.compile(P(json=SCHEMA)).new_matcher()
    mask = allowed(matcher)
    letter = first_token(tokenizer, "a")
    assert not mask[letter] and not mask[EOS] and mask[first_token(tokenizer, "{")]
    assert not matcher.accept(letter)
    assert matcher.error


def test_compact_json(backend, tokenizer):
    params = P(json=SCHEMA, disable_any_whitespace=True)
    walk(backend, tokenizer, params, '{"name":"Ada","age":36}')
    matcher = backend.compile(params).new_matcher()
    for token in tokenizer.encode('{"name":', add_special_tokens=False):
        assert matcher.accept(token)
    mask = allowed(matcher)
    assert mask[first_token(tokenizer, '"')] and not mask[first_token(tokenizer, " ")]


def test_json_object(backend, tokenizer):
    walk(backend, tokenizer, P(json_object=True), '{"x": [1, {"y": null}], "z": "w"}')
    mask = allowed(backend.compile(P(json_object=True)).new_matcher())
    assert not mask[first_token(tokenizer, "[")]


def test_regex(backend, tokenizer):
    walk(backend, tokenizer, P(regex=r"\d{3}-[a-z]+"), "123-abc")
    mask = allowed(backend.compile(P(regex=r"\d{3}-[a-z]+")).new_matcher())
    assert not mask[first_token(tokenizer, "a")] and mask[first_token(tokenizer, "1")]


def test_choice(backend, tokenizer):
    params = P(choice=["yes", "no", "maybe so", 'say "hi"\n'])
    for text in params.choice:
        walk(backend, tokenizer, params, text)
    mask = allowed(backend.compile(params).new_matcher())
    assert not mask[first_token(tokenizer, "x")] and mask[first_token(tokenizer, "yes")]


@pytest.mark.parametrize("grammar", [GBNF, LARK], ids=["gbnf", "lark"])
def test_grammar(backend, tokenizer, grammar):
    walk(backend, tokenizer, P(grammar=grammar), "(1+2)*34-5")
    mask = allowed(backend.compile(P(grammar=grammar)).new_matcher())
    assert not mask[first_token(tokenizer, "+")] and mask[first_token(tokenizer, "(")]


@pytest.mark.parametrize(
    "params, reason",
    [
        (P(regex="a(b"), "regex"),
        (P(json={"type": "strin"}), "strin"),
        (P(json={"type": "object", "if": {"required": ["a"]}}), r"""["']if["']"""),
        (P(json={"type": "array", "uniqueItems": True}), "uniqueItems"),
        (P(grammar='root ::= "a" (\n'), "line 2"),
        (P(grammar='start: "a" (\n'), "13"),  # the column
        (P(grammar='root ::= "a" missing\n'), "missing"),
        (P(grammar='start: "a" missing\n'), "missing"),
    ],
    ids=["regex", "type", "if", "uniqueItems", "gbnf", "lark", "gbnf-rule", "lark-rule"],
)
def test_invalid_constraints_are_refused(backend, params, reason):
    for step in (backend.check, backend.compile):
        with pytest.raises(InvalidRequestError, match=reason) as e:
            step(params)
        assert e.value.param == "structured_outputs"


def test_keywords_as_property_names_are_not_refused(backend, tokenizer):
    schema = {"type": "object", "properties": {"not": {"type": "integer"}}, "required": ["not"]}
    walk(backend, tokenizer, P(json=schema), '{"not": 1}')


def test_whitespace_pattern(backend, tokenizer):
    params = P(json=SCHEMA, whitespace_pattern=r"[ ]?")
    if backend.name == "xgrammar":  # xgrammar 0.2 takes no whitespace pattern
        with pytest.raises(InvalidRequestError, match="whitespace_pattern"):
            backend.check(params)
        return
    walk(backend, tokenizer, params, '{"name": "Ada", "age": 36}')


def test_padding_bits_past_the_tokenizer_are_zero(padded_backend, tokenizer):
    """The model's vocabulary is larger than the tokenizer's: those ids are never allowed,
    even by a regex that allows almost everything (`allowed` checks past PADDED_VOCAB)."""
    matcher = padded_backend.compile(P(regex=r"(.|\n)*")).new_matcher()
    mask = allowed(matcher, PADDED_VOCAB)
    assert mask[:VOCAB].sum() > VOCAB // 2 and not mask[VOCAB:].any()
    for token in tokenizer.encode("hello world", add_special_tokens=False):
        assert matcher.accept(token)
    assert not allowed(matcher, PADDED_VOCAB)[VOCAB:].any()
    assert matcher.accept(EOS)
    assert np.flatnonzero(allowed(matcher, PADDED_VOCAB)).tolist() == [EOS]


@pytest.mark.parametrize(
    "where, keyword",
    [
        ("", {"if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}),
        ("", {"not": {"required": ["b"]}}),
        ("", {"dependentRequired": {"b": ["c"]}}),
        ("", {"dependentSchemas": {"b": {"required": ["c"]}}}),
        ("", {"propertyNames": {"pattern": "^[a-c]$"}}),
        ("c", {"uniqueItems": True}),
        ("c", {"contains": {"const": 3}}),
    ],
)
def test_xgrammar_still_ignores_the_keywords_it_refuses(where, keyword):
    """UNENFORCED_KEYWORDS holds keywords that xgrammar drops silently: when one starts to
    change the grammar, it can leave the list."""
    import xgrammar

    from xlaserve.structured.xgrammar_backend import UNENFORCED_KEYWORDS, unenforced_keywords

    base = {
        "type": "object",
        "properties": {
            "a": {"type": "integer"},
            "b": {"type": "string"},
            "c": {"type": "array", "items": {"type": "integer"}},
        },
    }
    schema = json.loads(json.dumps(base))
    (schema if not where else schema["properties"][where]).update(keyword)
    assert unenforced_keywords(schema) == set(keyword) <= UNENFORCED_KEYWORDS
    grammar = xgrammar.Grammar.from_json_schema
    assert str(grammar(json.dumps(schema))) == str(grammar(json.dumps(base)))


def test_batched_fill_equals_row_by_row(backend, tokenizer):
    # Five matchers at different points of three constraints: the batched fill (llguidance
    # fills rows in parallel) gives exactly the rows one-by-one fills give.
    schema = P(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    texts = [(schema, ""), (schema, '{"a'), (P(regex=r"\d{3}-\d{4}"), "12"),
             (P(choice=["red", "green"]), ""), (P(regex=r"\d{3}-\d{4}"), "123")]  # fmt: skip
    matchers = []
    for params, prefix in texts:
        matcher = backend.compile(params).new_matcher()
        for token in tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []:
            assert matcher.accept(token)
        matchers.append(matcher)
    width = bitmask_width(VOCAB)
    one_by_one = np.empty((len(matchers), width), np.int32)
    for i, matcher in enumerate(matchers):
        matcher.fill_bitmask(one_by_one[i])
    batched = np.zeros((len(matchers), width), np.int32)
    backend.fill_bitmasks(matchers, batched)
    np.testing.assert_array_equal(batched, one_by_one)
    assert len({row.tobytes() for row in batched}) == len(matchers)  # the states really differ
