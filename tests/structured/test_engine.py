"""Structured outputs through the whole engine.

On SmolLM2-135M-Instruct (slow): every constrained output validates (11 JSON schemas of rising
difficulty, regexes, a choice, a Lark arithmetic grammar), greedy and seeded-sampled, batched
together with unconstrained requests whose tokens do not change; the sampling options (n,
seeds, penalties, logit bias, logprobs, stop strings, max_tokens), preemption and prefix caching
keep their meaning; the torch backend and the xgrammar grammar backend apply the same masks;
bad constraints are refused naming the problem and the engine goes on. The grammar manager on
the mock engine: test_compile_async.py.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass

import jsonschema
import pytest

from tests.conftest import ENGINE_KWARGS
from xlaserve import LLM, SamplingParams
from xlaserve.errors import InvalidRequestError

# ==== SmolLM2: constraints and their checks ===================================================

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
}
POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": -100, "maximum": 100},
        "y": {"type": "integer", "minimum": -100, "maximum": 100},
    },
    "required": ["x", "y"],
    "additionalProperties": False,
}
# (name, user message, schema): roughly in order of difficulty. Strings carry maxLength and
# arrays maxItems so every answer fits its max_tokens.
SCHEMAS = [
    ("flat", "Name a city in one JSON object.",
     {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
      "additionalProperties": False}),
    ("required", "Describe a person as JSON with a name and an age.", PERSON),
    ("enums", "Pick a t-shirt color and size, as JSON.",
     {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                       "size": {"type": "string", "enum": ["S", "M", "L"]}},
      "required": ["color", "size"]}),
    ("bounds", "Give a year, a score between 0 and 1 and a digit, as JSON.",
     {"type": "object", "properties": {
         "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
         "score": {"type": "number", "minimum": 0, "maximum": 1},
         "digit": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
         "ok": {"type": "boolean"}},
      "required": ["year", "score", "digit", "ok"], "additionalProperties": False}),
    ("nested", "Describe a book and its author as JSON.",
     {"type": "object", "properties": {"book": {
         "type": "object", "properties": {
             "title": {"type": "string", "maxLength": 24},
             "author": {"type": "object", "properties": {
                 "first": {"type": "string", "maxLength": 12},
                 "last": {"type": "string", "maxLength": 12}},
                 "required": ["first", "last"]}},
         "required": ["title", "author"], "additionalProperties": False}},
      "required": ["book"], "additionalProperties": False}),
    ("array bounds", "List two or three tags for a blog post about cooking, as JSON.",
     {"type": "object", "properties": {"tags": {
         "type": "array", "items": {"type": "string", "maxLength": 10},
         "minItems": 2, "maxItems": 3}},
      "required": ["tags"]}),
    ("array of objects", "A shopping list as a JSON array of items with quantities.",
     {"type": "array", "minItems": 1, "maxItems": 2, "items": {
         "type": "object", "properties": {
             "item": {"type": "string", "maxLength": 10},
             "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
         "required": ["item", "qty"], "additionalProperties": False}}),
    ("$ref", "A line segment from one point to another, as JSON.",
     {"$defs": {"point": POINT}, "type": "object",
      "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
      "required": ["start", "end"]}),
    ("anyOf", "An id (number or short text) and a flag that may be null, as JSON.",
     {"type": "object", "properties": {
         "id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9999},
                          {"type": "string", "maxLength": 8}]},
         "flag": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}},
      "required": ["id", "flag"]}),
    ("pattern", "Invent a flight code like ABC-12 and a short note, as JSON.",
     {"type": "object", "properties": {
         "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
         "note": {"type": "string", "minLength": 1, "maxLength": 12},
         "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
      "required": ["code", "note", "email"]}),
    ("closed object", "A user account with roles, as JSON.",
     {"type": "object", "additionalProperties": False, "properties": {
         "user": {"type": "object", "additionalProperties": False,
                  "properties": {"login": {"type": "string", "pattern": "^[a-z]{2,10}$"},
                                 "uid": {"type": "integer", "minimum": 1000, "maximum": 9999}},
                  "required": ["login", "uid"]},
         "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]},
                   "minItems": 1, "maxItems": 2},
         "active": {"type": "boolean"}},
      "required": ["user", "roles", "active"]}),
]  # fmt: skip
DATE = (
    r"(January|February|March|April|May|June|July|August|September|October|November|December)"
    r" [1-9][0-9]?, (19|20)[0-9]{2}"
)
ARITHMETIC = """start: expr
expr: term (OP term)~0..3
term: NUMBER | "(" expr ")"
OP: "+" | "-" | "*"
NUMBER: /0|[1-9][0-9]{0,2}/
"""
ARITHMETIC_NODES = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult)


def parses_as_arithmetic(text: str) -> bool:
    """Integers joined by + - * with parentheses, as Python reads them: no unary minus, no
    leading zeros (Python refuses "007"), nothing else."""
    if not re.fullmatch(r"[0-9+\-*()]+", text):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    return all(isinstance(node, ARITHMETIC_NODES) for node in ast.walk(tree))


@dataclass(frozen=True)
class Case:
    name: str
    message: str
    constraint: dict  # StructuredOutputsParams fields
    max_tokens: int

    @property
    def prompt(self) -> dict:
        return {"messages": [{"role": "user", "content": self.message}]}

    def params(self, **kw) -> SamplingParams:
        kw.setdefault("max_tokens", self.max_tokens)
        return SamplingParams(structured_outputs=self.constraint, **kw)

    def is_valid(self, text: str) -> bool:
        kind, value = next(iter(self.constraint.items()))
        if kind == "json":
            schema = json.loads(value) if isinstance(value, str) else value
            try:
                jsonschema.validate(json.loads(text), schema)
            except (json.JSONDecodeError, jsonschema.ValidationError):
                return False
            return True
        if kind == "regex":
            return re.fullmatch(value, text) is not None
        if kind == "choice":
            return text in value
        return parses_as_arithmetic(text)


CASES = [
    # The first schema goes in as JSON text, one more with compact JSON (no free whitespace).
    Case(name, message, {"json": json.dumps(schema) if i == 0 else schema,
                         **({"disable_any_whitespace": True} if i == 4 else {})}, 96)
    for i, (name, message, schema) in enumerate(SCHEMAS)
] + [
    Case("regex date", "When did Apollo 11 land on the Moon? Answer with a date.",
         {"regex": DATE}, 16),
    Case("regex code", "Invent a product code of two letters and four digits.",
         {"regex": r"[A-Z]{2}-[0-9]{4}"}, 12),
    Case("choice", "Is the review 'I loved this movie!' positive, negative or neutral?",
         {"choice": ["positive", "negative", "neutral"]}, 4),
    Case("grammar", "Write an arithmetic expression such as (3+4)*2-1 that equals 12.",
         {"grammar": ARITHMETIC}, 32),
]  # fmt: skip
BY_NAME = {c.name: c for c in CASES}
PLAIN = [
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a small village by the sea, there lived",
]
PLAIN_GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
PLAIN_SEEDED = [SamplingParams(temperature=0.9, top_p=0.95, seed=11 + i, max_tokens=24)
                for i in range(len(PLAIN))]  # fmt: skip


def greedy(case: Case, **kw) -> SamplingParams:
    return case.params(temperature=0.0, **kw)


def sampled(case: Case, seed: int, **kw) -> SamplingParams:
    return case.params(temperature=0.8, top_p=0.95, seed=seed, **kw)


def assert_valid_and_complete(case: Case, completion) -> None:
    assert case.is_valid(completion.text), (case.name, completion.text)
    assert completion.finish_reason == "stop", (case.name, completion.text)


def assert_no_compiles_and_pages_back(llm) -> None:
    m = llm.get_metrics()
    assert m["compiles_after_warmup"] == 0
    assert m["kv_pages_free"] == m["kv_pages_total"]
    assert m["num_running"] == m["num_waiting"] == 0


@pytest.fixture(scope="module")
def mixed(smollm2_llm):
    """One generate call: every case greedy and seeded-sampled, interleaved with unconstrained
    greedy and seeded prompts (38 requests). {(case name, "greedy" | "sampled"): completion}
    and {("plain", "greedy" | "sampled", i): completion}."""
    prompts, params, keys = [], [], []
    for i, case in enumerate(CASES):
        prompts += [case.prompt, case.prompt]
        params += [greedy(case), sampled(case, seed=100 + i)]
        keys += [(case.name, "greedy"), (case.name, "sampled")]
        if i < len(PLAIN):  # unconstrained rows spread over the batch
            prompts += [PLAIN[i], PLAIN[i]]
            params += [PLAIN_GREEDY, PLAIN_SEEDED[i]]
            keys += [("plain", "greedy", i), ("plain", "sampled", i)]
    outputs = smollm2_llm.generate(prompts, params, use_tqdm=False)
    return {key: out.outputs[0] for key, out in zip(keys, outputs, strict=True)}


# ---- 1. validity ---------------------------------------------------------------------------
@pytest.mark.slow
def test_every_constrained_output_validates_greedy_and_sampled(mixed):
    assert len(SCHEMAS) >= 10
    for case in CASES:
        for mode in ("greedy", "sampled"):
            assert_valid_and_complete(case, mixed[case.name, mode])


# ---- 2. unconstrained rows are untouched ---------------------------------------------------
@pytest.mark.slow
def test_unconstrained_tokens_are_the_same_without_constrained_neighbours(smollm2_llm, mixed):
    alone = smollm2_llm.generate(
        PLAIN + PLAIN, [PLAIN_GREEDY] * len(PLAIN) + PLAIN_SEEDED, use_tqdm=False
    )
    for i in range(len(PLAIN)):
        assert alone[i].outputs[0].token_ids == mixed["plain", "greedy", i].token_ids
        assert alone[len(PLAIN) + i].outputs[0].token_ids == mixed["plain", "sampled", i].token_ids
    assert_no_compiles_and_pages_back(smollm2_llm)


# ---- 3. sampling options, preemption, prefix caching ---------------------------------------
STOP = '"age"'


@pytest.fixture(scope="module")
def features(smollm2_llm):
    """One batch of constrained requests with sampling options: {name: RequestOutput}."""
    tok = smollm2_llm.get_tokenizer()
    sure = tok.encode("Sure", add_special_tokens=False)
    assert len(sure) == 1
    person = BY_NAME["required"]
    requests = {
        "n": (person, sampled(person, seed=5, n=3)),
        "penalties": (person, greedy(person, repetition_penalty=1.3, presence_penalty=0.5,
                                     frequency_penalty=0.5, logit_bias={sure[0]: 100.0})),
        "logprobs": (BY_NAME["$ref"], greedy(BY_NAME["$ref"], logprobs=3)),
        "stop": (person, greedy(person, stop=[STOP])),
        "length": (BY_NAME["nested"], greedy(BY_NAME["nested"], max_tokens=6)),
        "busy seeded": (BY_NAME["enums"], sampled(BY_NAME["enums"], seed=42)),
        "plain": (None, PLAIN_GREEDY),
    }  # fmt: skip
    prompts = [PLAIN[0] if case is None else case.prompt for case, _ in requests.values()]
    outputs = smollm2_llm.generate(prompts, [p for _, p in requests.values()], use_tqdm=False)
    return dict(zip(requests, outputs, strict=True))


@pytest.mark.slow
def test_n_samples_each_validate(features):
    out = features["n"]
    assert len(out.outputs) == 3
    for completion in out.outputs:
        assert_valid_and_complete(BY_NAME["required"], completion)


@pytest.mark.slow
def test_same_seed_gives_the_same_text_alone_and_in_a_busy_batch(smollm2_llm, features, mixed):
    case = BY_NAME["enums"]
    alone = smollm2_llm.generate(case.prompt, sampled(case, seed=42), use_tqdm=False)[0]
    assert alone.outputs[0].text == features["busy seeded"].outputs[0].text
    assert_valid_and_complete(case, alone.outputs[0])
    # A seeded request of the mixed batch (38 requests), alone.
    case, i = BY_NAME["pattern"], CASES.index(BY_NAME["pattern"])
    alone = smollm2_llm.generate(case.prompt, sampled(case, seed=100 + i), use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == mixed["pattern", "sampled"].token_ids


@pytest.mark.slow
def test_penalties_and_logit_bias_apply_and_outputs_still_validate(features):
    """+100 on "Sure": drawn wherever the grammar allows it (inside the name string, up to its
    maxLength of 16), never where it does not (the mask is applied after the bias)."""
    completion = features["penalties"].outputs[0]
    assert_valid_and_complete(BY_NAME["required"], completion)
    name = json.loads(completion.text)["name"]
    assert "Sure" in name and len(name) <= 16
    assert completion.text.lstrip().startswith("{")


@pytest.mark.slow
def test_logprobs_are_returned_for_every_constrained_token(features):
    completion = features["logprobs"].outputs[0]
    assert_valid_and_complete(BY_NAME["$ref"], completion)
    assert len(completion.logprobs) == len(completion.token_ids)
    total = 0.0
    for token, position in zip(completion.token_ids, completion.logprobs, strict=True):
        assert len(position) in (3, 4)  # the top 3, plus the sampled token when outside them
        lp = position[token].logprob  # of the model's distribution, before the mask
        assert math.isfinite(lp) and lp <= 0.0
        total += lp
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)


@pytest.mark.slow
def test_stop_string_inside_the_json_ends_it_there(features, mixed):
    """The contract: a stop string wins over the grammar; the text is the greedy answer up to
    the stop string, so it is a prefix of valid JSON and does not parse."""
    full = mixed["required", "greedy"].text
    completion = features["stop"].outputs[0]
    assert STOP in full
    assert completion.text == full[: full.index(STOP)]
    assert completion.finish_reason == "stop" and completion.stop_reason == STOP
    with pytest.raises(json.JSONDecodeError):
        json.loads(completion.text)


@pytest.mark.slow
def test_max_tokens_cutting_json_short_finishes_by_length(features, mixed):
    full = mixed["nested", "greedy"]
    completion = features["length"].outputs[0]
    assert completion.finish_reason == "length"
    assert completion.token_ids == full.token_ids[:6] and len(full.token_ids) > 6
    assert full.text.startswith(completion.text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(completion.text)
    # The unconstrained request of the same batch is what it is alone.
    assert features["plain"].outputs[0].token_ids == mixed["plain", "greedy", 0].token_ids


@pytest.fixture(scope="module")
def small_pool_llm():
    """Prefix caching off and a KV pool of 40 pages (one max_model_len sequence needs 32)."""
    page_bytes = 30 * 16 * 2 * 3 * 64 * 4  # layers * page * (K and V) * kv heads * dim * f32
    return LLM(
        "smollm2-135m-instruct",
        **ENGINE_KWARGS,
        enable_prefix_caching=False,
        kv_cache_memory=40 * page_bytes,
    )


@pytest.mark.slow
def test_preempted_constrained_requests_give_the_unpreempted_outputs(small_pool_llm, mixed):
    # 15 chat prompts of ~50 tokens, growing to 4-9 pages each, cannot all fit in 40 pages.
    cases = CASES
    outputs = small_pool_llm.generate(
        [c.prompt for c in cases], [greedy(c) for c in cases], use_tqdm=False
    )
    assert small_pool_llm.get_metrics()["preemptions"] > 0
    for case, out in zip(cases, outputs, strict=True):
        assert_valid_and_complete(case, out.outputs[0])
        assert out.outputs[0].token_ids == mixed[case.name, "greedy"].token_ids, case.name
    assert_no_compiles_and_pages_back(small_pool_llm)


@pytest.mark.slow
def test_prefix_cache_serves_a_repeated_constrained_prompt(smollm2_llm, mixed):
    case = BY_NAME["array bounds"]
    first = smollm2_llm.generate(case.prompt, greedy(case), use_tqdm=False)[0]
    second = smollm2_llm.generate(case.prompt, greedy(case), use_tqdm=False)[0]
    assert second.num_cached_tokens > 0
    assert second.num_cached_tokens % smollm2_llm.engine.page_size == 0  # whole pages
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert first.outputs[0].token_ids == mixed[case.name, "greedy"].token_ids
    assert_valid_and_complete(case, second.outputs[0])


# ---- 4. the torch backend and the xgrammar grammar backend ---------------------------------
TORCH_CASES = [BY_NAME[n] for n in ("required", "$ref", "regex code", "choice", "grammar")]


@pytest.fixture(scope="module")
def torch_llm():
    import torch

    # On 2 shared cores torch's default pool spins against JAX's threads (~10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLM("smollm2-135m-instruct", backend="torch", **ENGINE_KWARGS)
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_torch_backend_applies_the_same_mask(torch_llm, mixed):
    outputs = torch_llm.generate(
        [c.prompt for c in TORCH_CASES], [greedy(c) for c in TORCH_CASES], use_tqdm=False
    )
    for case, out in zip(TORCH_CASES, outputs, strict=True):
        assert_valid_and_complete(case, out.outputs[0])
        # float32 logits agree to ~2e-4 across backends: the same greedy tokens here.
        assert out.outputs[0].token_ids == mixed[case.name, "greedy"].token_ids, case.name
    assert_no_compiles_and_pages_back(torch_llm)


@pytest.fixture(scope="module")
def xgrammar_llm():
    return LLM("smollm2-135m-instruct", structured_outputs_backend="xgrammar", **ENGINE_KWARGS)


@pytest.mark.slow
def test_xgrammar_backend_outputs_validate(xgrammar_llm):
    cases = CASES
    params = [greedy(c) for c in cases] + [sampled(c, seed=7) for c in cases[::3]]
    prompts = [c.prompt for c in cases] + [c.prompt for c in cases[::3]]
    outputs = xgrammar_llm.generate(prompts, params, use_tqdm=False)
    for case, out in zip(cases + cases[::3], outputs, strict=True):
        assert_valid_and_complete(case, out.outputs[0])
    assert xgrammar_llm.engine.structured.backend.name == "xgrammar"
    assert_no_compiles_and_pages_back(xgrammar_llm)


# ---- 5. bad constraints ----------------------------------------------------------------------
BAD = [
    ("invalid json schema", {"json": {"type": "strin"}}, "strin"),
    ("unsupported keyword", {"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ("dangling $ref", {"json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/no"}}}},
     "/\\$defs/no"),
    ("invalid regex", {"regex": "a(b"}, "unclosed group"),
    ("empty choice", {"choice": []}, "choice must be a non-empty list"),
    ("two kinds", {"json": PERSON, "regex": "a"}, "exactly one of .*got json, regex"),
    ("schema not an object", {"json": "[1, 2]"}, "must be a JSON object, got list"),
    ("schema text not JSON", {"json": "{oops"}, "not valid JSON"),
    ("invalid grammar", {"grammar": 'start: "a" missing\n'}, "missing"),
    ("unknown field", {"regex": "a", "backend": "xgrammar"}, "unsupported structured_outputs"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("constraint, reason", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_constraints_are_refused_and_the_engine_goes_on(smollm2_llm, mixed, constraint,
                                                            reason):  # fmt: skip
    good = BY_NAME["choice"]
    with pytest.raises(InvalidRequestError, match=reason) as e:
        # After a good request: a refusal takes the whole call back (nothing left queued).
        smollm2_llm.generate(
            [good.prompt, PLAIN[0]],
            [greedy(good), SamplingParams(max_tokens=4, structured_outputs=constraint)],
            use_tqdm=False,
        )
    assert e.value.param == "structured_outputs"
    assert isinstance(e.value, ValueError)
    assert not smollm2_llm.engine.has_unfinished_requests()
    out = smollm2_llm.generate(PLAIN[0], SamplingParams(temperature=0.0, max_tokens=6),
                               use_tqdm=False)[0]  # fmt: skip
    assert out.outputs[0].token_ids == mixed["plain", "greedy", 0].token_ids[:6]
    assert_no_compiles_and_pages_back(smollm2_llm)
