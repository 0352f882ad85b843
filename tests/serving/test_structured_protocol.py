"""Structured outputs over the protocols: every request form becomes the exact
`StructuredOutputsParams`, bad constraints are refused with 400 naming the field the client sent
(or INVALID_ARGUMENT), and the server keeps serving.

The servers here run the mock engine (tests/engine/mock_runner.py: vocab 97, max_model_len 64)
with a real llguidance backend, so the grammar checks are llguidance's. The mock runner ignores
token masks: outputs are not constrained here, only accepted or refused (constrained generation
is checked on SmolLM2 at the end of this file).
"""

import functools
import json

import grpc
import pytest
from pydantic import BaseModel

from tests.conftest import ENGINE_KWARGS
from tests.engine.mock_runner import VOCAB_SIZE, EngineMockRunner
from tests.serving.helpers import API_KEY, AUTH, CHAT_TEMPLATE
from tests.serving.test_bad_inputs import (
    CHAT,
    COMPLETIONS,
    assert_grpc_serves,
    assert_http_serves,
    body,
    chat,
    gen,
    grpc_call,
)
from xlaserve.engine.async_engine import AsyncEngine
from xlaserve.engine.llm_engine import LLMEngine
from xlaserve.engine.scheduler import Scheduler, SchedulerConfig
from xlaserve.errors import InvalidRequestError
from xlaserve.serving.client import XlaServeClient, build_request
from xlaserve.serving.errors import ServingError
from xlaserve.serving.grpc_convert import (
    sampling_params_from_proto,
    structured_outputs_from_proto,
    structured_outputs_to_proto,
)
from xlaserve.serving.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_body
from xlaserve.serving.proto import xlaserve_pb2 as pb
from xlaserve.serving.server import ServerConfig, ServerThread
from xlaserve.structured.manager import StructuredOutputManager, make_backend
from xlaserve.structured.params import StructuredOutputsParams as SOP

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}
GRAMMAR = 'start: expr\nexpr: NUMBER ("+" NUMBER)*\nNUMBER: /[0-9]+/'
COMPILE_FAILS = "this regex passes the checks but fails to compile"


# ---- request conversion: HTTP ----------------------------------------------------------------
def response_format_schema(schema=SCHEMA, **extra) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, **extra}}


# (name, extra body fields, the StructuredOutputsParams they must give; None: unconstrained)
HTTP_FORMS = [
    ("no constraint", {}, None),
    ("response_format text", {"response_format": {"type": "text"}}, None),
    ("response_format json_object", {"response_format": {"type": "json_object"}},
     SOP(json_object=True)),
    ("response_format json_schema", {"response_format": response_format_schema()},
     SOP(json=SCHEMA)),
    ("response_format json_schema strict with description",
     {"response_format": response_format_schema(strict=True, description="a person")},
     SOP(json=SCHEMA)),
    ("structured_outputs json", {"structured_outputs": {"json": SCHEMA}}, SOP(json=SCHEMA)),
    ("structured_outputs json as text", {"structured_outputs": {"json": json.dumps(SCHEMA)}},
     SOP(json=json.dumps(SCHEMA))),
    ("structured_outputs json_object compact",
     {"structured_outputs": {"json_object": True, "disable_any_whitespace": True}},
     SOP(json_object=True, disable_any_whitespace=True)),
    ("structured_outputs regex", {"structured_outputs": {"regex": "[a-z]+"}},
     SOP(regex="[a-z]+")),
    ("structured_outputs choice", {"structured_outputs": {"choice": ["yes", "no"]}},
     SOP(choice=("yes", "no"))),
    ("structured_outputs grammar", {"structured_outputs": {"grammar": GRAMMAR}},
     SOP(grammar=GRAMMAR)),
    ("structured_outputs whitespace_pattern",
     {"structured_outputs": {"json": SCHEMA, "whitespace_pattern": "[ ]?"}},
     SOP(json=SCHEMA, whitespace_pattern="[ ]?")),
    ("guided_json", {"guided_json": SCHEMA}, SOP(json=SCHEMA)),
    ("guided_json as text", {"guided_json": json.dumps(SCHEMA)}, SOP(json=json.dumps(SCHEMA))),
    ("guided_regex", {"guided_regex": "[0-9]{3}"}, SOP(regex="[0-9]{3}")),
    ("guided_choice", {"guided_choice": ["a", "b"]}, SOP(choice=("a", "b"))),
    ("guided_grammar", {"guided_grammar": GRAMMAR}, SOP(grammar=GRAMMAR)),
    ("guided_json with guided_whitespace_pattern",
     {"guided_json": SCHEMA, "guided_whitespace_pattern": "[ ]?"},
     SOP(json=SCHEMA, whitespace_pattern="[ ]?")),
    ("response_format with guided_whitespace_pattern",
     {"response_format": {"type": "json_object"}, "guided_whitespace_pattern": " "},
     SOP(json_object=True, whitespace_pattern=" ")),
    ("guided_decoding_backend auto", {"guided_regex": "a", "guided_decoding_backend": "auto"},
     SOP(regex="a")),
    ("guided_decoding_backend naming the server's",
     {"guided_regex": "a", "guided_decoding_backend": "guidance"}, SOP(regex="a")),
]  # fmt: skip


def http_request(endpoint: str, fields: dict):
    base = chat() if endpoint == "chat" else body()
    model = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
    return parse_body(json.dumps({**base, **fields}).encode(), model)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("case", HTTP_FORMS, ids=[c[0] for c in HTTP_FORMS])
def test_http_forms_give_the_exact_params(endpoint, case):
    _, fields, want = case
    params = http_request(endpoint, fields).sampling_params(structured_backend="guidance")
    assert params.structured_outputs == want
    if want is not None and want.kind == "json":
        assert params.structured_outputs.schema_text == want.schema_text


def test_a_schema_keeps_its_property_order():
    schema = {"type": "object", "properties": {"z": {}, "a": {}, "m": {}}}
    req = http_request("chat", {"response_format": response_format_schema(schema)})
    got = req.sampling_params().structured_outputs.json
    assert list(got["properties"]) == ["z", "a", "m"]


# ---- request conversion: gRPC ----------------------------------------------------------------
GRPC_FORMS = [
    SOP(json=SCHEMA),
    SOP(json=json.dumps(SCHEMA)),
    SOP(json_object=True),
    SOP(json_object=True, disable_any_whitespace=True),
    SOP(json=SCHEMA, whitespace_pattern="[ ]?"),
    SOP(regex="[a-z]+"),
    SOP(choice=("yes", "no", "maybe")),
    SOP(grammar=GRAMMAR),
]


@pytest.mark.parametrize("params", GRPC_FORMS, ids=lambda p: p.kind)
def test_grpc_message_round_trips_to_the_same_params(params):
    msg = structured_outputs_to_proto(params)
    back = structured_outputs_from_proto(pb.StructuredOutputs.FromString(msg.SerializeToString()))
    assert back.cache_key() == params.cache_key()
    assert (back.disable_any_whitespace, back.whitespace_pattern) == (
        params.disable_any_whitespace, params.whitespace_pattern
    )  # fmt: skip


def test_grpc_messages_give_the_exact_params():
    S = pb.StructuredOutputs
    assert structured_outputs_from_proto(S(json_schema='{"type": "object"}')) == SOP(
        json='{"type": "object"}'
    )
    assert structured_outputs_from_proto(S(json_object=True)) == SOP(json_object=True)
    assert structured_outputs_from_proto(S(regex="a|b")) == SOP(regex="a|b")
    assert structured_outputs_from_proto(S(choice=S.Choice(options=["x", "y"]))) == SOP(
        choice=("x", "y")
    )
    assert structured_outputs_from_proto(S(grammar=GRAMMAR)) == SOP(grammar=GRAMMAR)
    got = structured_outputs_from_proto(
        S(json_object=True, disable_any_whitespace=True, whitespace_pattern="")
    )
    assert got == SOP(json_object=True, disable_any_whitespace=True, whitespace_pattern="")


def test_client_keyword_reaches_sampling_params():
    for value in ({"json": SCHEMA}, SOP(json=SCHEMA)):
        request = build_request([1, 2, 3], max_tokens=4, structured_outputs=value)
        params = sampling_params_from_proto(request.sampling_params)
        # The schema travels as JSON text, in the order the client wrote it.
        assert params.structured_outputs == SOP(json=json.dumps(SCHEMA))
        assert params.structured_outputs.cache_key() == SOP(json=SCHEMA).cache_key()
        assert params.max_tokens == 4
    unconstrained = build_request([1], max_tokens=1)
    assert not unconstrained.sampling_params.HasField("structured_outputs")
    assert sampling_params_from_proto(unconstrained.sampling_params).structured_outputs is None


def test_client_checks_a_constraint_before_sending():
    with pytest.raises(InvalidRequestError, match="choice must be a non-empty list"):
        build_request([1], structured_outputs={"choice": []})
    with pytest.raises(InvalidRequestError, match="unsupported structured_outputs field"):
        build_request([1], structured_outputs={"regex": "a", "backend": "xgrammar"})


# ---- error params ----------------------------------------------------------------------------
def test_client_param_names_the_field_sent():
    req = http_request("chat", {"guided_regex": "a", "max_completion_tokens": 5})
    assert req.client_param("structured_outputs") == "guided_regex"
    assert req.client_param("max_tokens") == "max_completion_tokens"
    assert req.client_param("temperature") == "temperature"
    req = http_request("completions", {"response_format": {"type": "json_object"}})
    assert req.client_param("structured_outputs") == "response_format"
    assert req.client_param("max_tokens") == "max_tokens"
    req = http_request("completions", {"structured_outputs": {"regex": "a"}})
    assert req.client_param("structured_outputs") == "structured_outputs"


def test_a_backend_other_than_the_servers_is_refused():
    req = http_request("chat", {"guided_regex": "a", "guided_decoding_backend": "xgrammar"})
    with pytest.raises(ServingError) as info:
        req.sampling_params(structured_backend="guidance")
    assert info.value.param == "guided_decoding_backend"
    assert "'xgrammar' is not this server's grammar backend ('guidance')" in info.value.message


# ---- the servers -----------------------------------------------------------------------------
def byte_char_tokenizer():
    """The serving tests' char tokenizer (same ids: "Hi" -> [41, 74], space 1, eos 0) in the
    byte-level form that llguidance reads (a space is stored as "Ġ")."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # GPT-2's byte-to-unicode map on printable ASCII: each character is itself, but space "Ġ".
    as_char = {c: chr(c) for c in range(33, 127)} | {32: "\u0120"}
    vocab = {"<eos>": 0, **{as_char[c]: c - 31 for c in range(32, 127)}, "<unk>": 96}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [byte_level, pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


class CompileFailsFor:
    """The real backend, except that one regex passes its checks and then fails to compile
    (as a grammar too big for the compile time limit would): the request fails after it was
    accepted."""

    def __init__(self, backend, regex: str) -> None:
        self.backend, self.regex, self.name = backend, regex, backend.name

    def check(self, params):
        self.backend.check(params)

    def compile(self, params):
        if params.regex == self.regex:
            raise InvalidRequestError("structured_outputs", f"cannot compile {self.regex!r}")
        return self.backend.compile(params)

    def fill_bitmasks(self, matchers, out) -> None:
        self.backend.fill_bitmasks(matchers, out)


def structured_mock_engine() -> LLMEngine:
    """The serving tests' mock engine (page size 4, max_model_len 64, vocab 97, eos 0) with
    structured outputs on llguidance."""
    tokenizer = byte_char_tokenizer()
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=32,
            max_model_len=64,
            page_size=EngineMockRunner.kv_cache_spec.page_size,
            num_pages=64,
        )
    )
    backend = functools.partial(
        make_backend, "guidance", tokenizer, vocab_size=VOCAB_SIZE, eos_token_ids=(0,)
    )
    manager = StructuredOutputManager(
        lambda: CompileFailsFor(backend(), COMPILE_FAILS), vocab_size=VOCAB_SIZE
    )
    return LLMEngine(
        scheduler,
        EngineMockRunner(scheduler),
        tokenizer=tokenizer,
        vocab_size=VOCAB_SIZE,
        eos_token_ids=(0,),
        model_name="mock",
        dtype="none",
        structured=manager,
    )


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(grpc_port=0, http_port=0, api_key=API_KEY, max_body_bytes=64 << 10)
    server = ServerThread(AsyncEngine(structured_mock_engine()), config)
    server.start()
    yield server.endpoints
    assert server.stop() == 0


# (name, extra body fields, the error's param, words its message must contain)
HTTP_BAD = [
    ("response_format and guided_regex", {"response_format": {"type": "json_object"},
     "guided_regex": "a"}, "guided_regex", "got response_format, guided_regex"),
    ("structured_outputs and guided_json", {"structured_outputs": {"regex": "a"},
     "guided_json": SCHEMA}, "guided_json", "got structured_outputs, guided_json"),
    ("response_format and structured_outputs", {"response_format": response_format_schema(),
     "structured_outputs": {"json_object": True}}, "structured_outputs",
     "got response_format, structured_outputs"),
    ("guided_choice and guided_grammar", {"guided_choice": ["a"], "guided_grammar": GRAMMAR},
     "guided_grammar", "got guided_choice, guided_grammar"),
    ("two kinds inside structured_outputs", {"structured_outputs": {"regex": "a",
     "choice": ["b"]}}, "structured_outputs", "give exactly one of"),
    ("empty guided_choice", {"guided_choice": []}, "guided_choice",
     "choice must be a non-empty list"),
    ("empty structured_outputs choice", {"structured_outputs": {"choice": []}},
     "structured_outputs", "choice must be a non-empty list"),
    ("empty option in guided_choice", {"guided_choice": ["a", ""]}, "guided_choice",
     "non-empty strings"),
    ("json_schema without schema", {"response_format": {"type": "json_schema",
     "json_schema": {"name": "x"}}}, "response_format", "response_format.json_schema.schema is "
     "required"),
    ("json_schema type without json_schema", {"response_format": {"type": "json_schema"}},
     "response_format", "response_format.json_schema is required"),
    ("json_schema without a name", {"response_format": {"type": "json_schema",
     "json_schema": {"schema": SCHEMA}}}, "response_format", "json_schema.name is required"),
    ("unknown response_format type", {"response_format": {"type": "xml"}}, "response_format",
     "response_format.type: Input should be 'text', 'json_object' or 'json_schema'"),
    ("unknown field in json_schema", {"response_format": response_format_schema(foo=1)},
     "response_format", "unknown or unsupported field 'response_format.json_schema.foo'"),
    ("json_schema alongside type json_object", {"response_format": {"type": "json_object",
     "json_schema": {"name": "x", "schema": SCHEMA}}}, "response_format",
     "only allowed with type 'json_schema'"),
    ("response_format schema not an object", {"response_format": response_format_schema([1])},
     "response_format", "response_format.json_schema.schema: Input should be a valid "
     "dictionary"),
    ("guided_json not an object", {"guided_json": 5}, "guided_json",
     "guided_json: Input should be"),
    ("guided_json text not an object", {"guided_json": "[1, 2]"}, "guided_json",
     "json schema must be a JSON object, got list"),
    ("guided_json text not JSON", {"guided_json": "{"}, "guided_json", "not valid JSON"),
    ("structured_outputs json not an object", {"structured_outputs": {"json": 5}},
     "structured_outputs", "json schema must be a JSON object, got int"),
    ("structured_outputs not an object", {"structured_outputs": ["regex"]},
     "structured_outputs", "structured_outputs: Input should be a valid dictionary"),
    ("unknown structured_outputs field", {"structured_outputs": {"regex": "a",
     "structural_tag": "x"}}, "structured_outputs", "unsupported structured_outputs field"),
    ("another backend", {"guided_regex": "a", "guided_decoding_backend": "xgrammar"},
     "guided_decoding_backend", "'xgrammar' is not this server's grammar backend"),
    ("whitespace pattern without JSON", {"guided_regex": "a", "guided_whitespace_pattern": " "},
     "guided_whitespace_pattern", "applies to a JSON constraint"),
    # Refused by the engine's grammar checks (llguidance), named as the client sent them.
    ("invalid regex", {"guided_regex": "("}, "guided_regex", "invalid regex"),
    ("invalid regex in structured_outputs", {"structured_outputs": {"regex": "[a-"}},
     "structured_outputs", "invalid regex"),
    ("invalid schema type", {"response_format": response_format_schema({"type": "frob"})},
     "response_format", "Invalid type: frob"),
    ("unknown schema format", {"guided_json": {"type": "string", "format": "weird"}},
     "guided_json", "Unknown format: weird"),
    ("dangling $ref", {"response_format": response_format_schema(
     {"type": "object", "properties": {"a": {"$ref": "#/nope"}}})}, "response_format",
     "'/nope' does not exist"),
    ("invalid grammar", {"guided_grammar": "start: x"}, "guided_grammar",
     'unknown name: "x"'),
    # Accepted, then its grammar fails to compile: the request fails alone.
    ("grammar fails to compile", {"guided_regex": COMPILE_FAILS}, "guided_regex",
     f"cannot compile {COMPILE_FAILS!r}"),
]  # fmt: skip


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("case", HTTP_BAD, ids=[c[0] for c in HTTP_BAD])
def test_http_bad_constraint(http, path, case):
    _, fields, param, words = case
    request = {**(chat() if path == CHAT else body()), **fields}
    response = http.post(path, json=request)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"], error["code"]) == (param, "invalid_request_error", None)
    assert words in error["message"], error["message"]
    assert_http_serves(http)


def test_http_stream_reports_a_failed_compile_by_the_field_sent(http):
    request = chat(stream=True, response_format={"type": "text"}, guided_regex=COMPILE_FAILS)
    with http.stream("POST", CHAT, json=request) as response:
        assert response.status_code == 200  # the failure comes after the stream started
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["param"] == "guided_regex"
    assert f"cannot compile {COMPILE_FAILS!r}" in error["message"]
    assert_http_serves(http)


# (name, StructuredOutputs message, words the INVALID_ARGUMENT message must contain)
S = pb.StructuredOutputs
GRPC_BAD = [
    ("no kind set", S(disable_any_whitespace=True), "give exactly one of"),
    ("empty choice", S(choice=S.Choice()), "choice must be a non-empty list"),
    ("empty option", S(choice=S.Choice(options=["a", ""])), "non-empty strings"),
    ("json_object false", S(json_object=False), "give exactly one of"),
    ("empty regex", S(regex=""), "regex must be a non-empty string"),
    ("json_schema not an object", S(json_schema="[1, 2]"), "must be a JSON object, got list"),
    ("json_schema not JSON", S(json_schema="{"), "json schema is not valid JSON"),
    ("invalid regex", S(regex="("), "invalid regex"),
    ("invalid schema type", S(json_schema='{"type": "frob"}'), "Invalid type: frob"),
    ("invalid grammar", S(grammar="start: x"), 'unknown name: "x"'),
    ("grammar fails to compile", S(regex=COMPILE_FAILS), f"cannot compile {COMPILE_FAILS!r}"),
]


@pytest.mark.parametrize("case", GRPC_BAD, ids=[c[0] for c in GRPC_BAD])
def test_grpc_bad_constraint(channel, case):
    _, message, words = case
    request = gen(max_tokens=3)
    request.sampling_params.structured_outputs.CopyFrom(message)
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(channel, "Generate", request, AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert words in info.value.details()
    assert_grpc_serves(channel)


def test_http_and_grpc_give_the_same_message(http, channel):
    error = http.post(COMPLETIONS, json=body(structured_outputs={"regex": "("})).json()["error"]
    request = gen(max_tokens=3, structured_outputs={"regex": "("})
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(channel, "Generate", request, AUTH)
    assert info.value.details() == error["message"]


# A good constraint of each kind is accepted on both protocols (the mock's tokens are not
# constrained: it ignores masks, so no output text is checked here).
GOOD = [
    {"response_format": {"type": "json_object"}},
    {"response_format": response_format_schema(strict=True)},
    {"structured_outputs": {"choice": ["yes", "no"]}},
    {"guided_regex": "[a-z]+", "guided_decoding_backend": "auto"},
    {"guided_grammar": GRAMMAR},
    {"guided_json": SCHEMA, "guided_whitespace_pattern": "[ ]?"},
]


@pytest.mark.parametrize("fields", GOOD, ids=lambda f: "+".join(f))
def test_good_constraints_are_served_over_http(http, fields):
    for path, request in ((CHAT, chat(**fields)), (COMPLETIONS, body(**fields))):
        response = http.post(path, json=request)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_good_constraints_are_served_over_grpc(server):
    with XlaServeClient(server.grpc_target, api_key=API_KEY, timeout=30) as client:
        for params in GRPC_FORMS:
            result = client.generate([1, 2, 3], max_tokens=3, structured_outputs=params)
            assert result.finished and result.samples[0].finish_reason in ("stop", "length")


# ---- constrained generation over HTTP: SmolLM2 and the official openai client ----------------
MODEL = "smollm2-135m-instruct"
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def smollm2_oai():
    import openai

    from xlaserve.config import EngineArgs
    from xlaserve.engine.builder import build_replica

    engine = AsyncEngine(build_replica(EngineArgs(model=MODEL, **ENGINE_KWARGS)))
    server = ServerThread(engine, ServerConfig(grpc_port=0, http_port=0))
    server.start()
    yield openai.OpenAI(base_url=server.endpoints.http_url + "/v1", api_key="-", max_retries=0)
    assert server.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_openai_response_format_json_schema_validates(smollm2_oai, temperature):
    import jsonschema

    schema = {**SCHEMA, "properties": {**SCHEMA["properties"], "name": {"type": "string",
              "maxLength": 20}}, "additionalProperties": False}  # fmt: skip
    response = smollm2_oai.chat.completions.create(
        model=MODEL,
        messages=ASK_PERSON,
        max_completion_tokens=80,
        temperature=temperature,
        seed=7,
        n=2,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )  # fmt: skip
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.slow
def test_openai_parse_with_a_pydantic_model(smollm2_oai):
    completion = smollm2_oai.chat.completions.parse(
        model=MODEL,
        messages=ASK_PERSON,
        max_completion_tokens=80,
        temperature=0,
        response_format=Person,
    )
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and person.name


@pytest.mark.slow
def test_openai_vllm_fields_constrain_the_output(smollm2_oai):
    ask = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    for extra in ({"structured_outputs": {"choice": ["yes", "no"]}},
                  {"guided_choice": ["yes", "no"]}):  # fmt: skip
        answer = smollm2_oai.chat.completions.create(
            model=MODEL, messages=ask, max_completion_tokens=8, temperature=0, extra_body=extra
        )
        assert answer.choices[0].message.content in ("yes", "no")
    response = smollm2_oai.completions.create(
        model=MODEL, prompt="A US zip code:", max_tokens=10, temperature=1.0, seed=3,
        extra_body={"guided_regex": "[0-9]{5}"},
    )  # fmt: skip
    assert response.choices[0].text.isdigit() and len(response.choices[0].text) == 5
