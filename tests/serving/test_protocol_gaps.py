"""Protocol gaps real clients found (issue 21): JetStream's lora_adapter_id and has_bos, the
JetStream-only listener and its auth, undecodable gRPC bytes, lone surrogates over HTTP, quiet
client disconnects, and Prometheus series under vLLM's names.

The mock engine's next token is the sum of every token so far modulo 97 (tests/engine/
mock_runner.py), so expected ids are worked out by hand in comments."""

import logging
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.helpers import API_KEY, AUTH, pages_all_free, start_mock_server, wait_until
from xlaserve.serving.context import ServerConfig
from xlaserve.serving.proto import jetstream_pb2 as js
from xlaserve.serving.proto import jetstream_pb2_grpc as js_grpc
from xlaserve.serving.proto import xlaserve_pb2 as pb
from xlaserve.serving.proto import xlaserve_pb2_grpc as pb_grpc

Code = grpc.StatusCode
BOS = 96


def bos_char_tokenizer():
    """The helpers' char tokenizer, but id 96 is "<bos>", put before every text with special
    tokens (as Llama's tokenizers do): "Hi" -> [96, 41, 74]."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{chr(c): c - 31 for c in range(32, 127)}, "<bos>": BOS}
    tok = Tokenizer(WordLevel(vocab))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


@pytest.fixture(scope="module")
def bos_server():
    server, _, _ = start_mock_server(tokenizer=bos_char_tokenizer())
    yield server.endpoints
    server.stop()


def decode_ids(channel, metadata=AUTH, **fields) -> list[int]:
    stub = js_grpc.OrchestratorStub(channel)
    responses = stub.Decode(js.DecodeRequest(**fields), timeout=10, metadata=metadata)
    return [t for r in responses for t in r.stream_content.samples[0].token_ids]


def tokens(*ids):
    return js.DecodeRequest.TokenContent(token_ids=list(ids))


def text(value):
    return js.DecodeRequest.TextContent(text=value)


# ---- JetStream fields -------------------------------------------------------------------------


def test_unknown_lora_adapter_id_is_refused_naming_it(bos_server):
    with grpc.insecure_channel(bos_server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            decode_ids(channel, token_content=tokens(1, 2), max_tokens=2, lora_adapter_id="sql-v2")
    assert e.value.code() == Code.INVALID_ARGUMENT
    assert "lora_adapter_id 'sql-v2' names no loaded LoRA adapter (loaded: none)" in (
        e.value.details()
    )


@pytest.mark.parametrize(
    "content, has_bos, expected",
    [
        # [96, 1, 2, 3]: sum 102 -> 5; 107 -> 10; 117 -> 20; 137 -> 40 (BOS put in front)
        (tokens(1, 2, 3), False, [5, 10, 20, 40]),
        # [1, 2, 3] as given: 6, 12, 24, 48
        (tokens(1, 2, 3), True, [6, 12, 24, 48]),
        # already starts with BOS: not doubled (two would give 198 % 97 = 4 first)
        (tokens(BOS, 1, 2, 3), False, [5, 10, 20, 40]),
        # "Hi" -> [96, 41, 74]: 211 % 97 = 17; 228 -> 34; 262 -> 68
        (text("Hi"), False, [17, 34, 68]),
        # "Hi" -> [41, 74] (the text has its BOS, none added): 115 -> 18; 133 -> 36; 169 -> 72
        (text("Hi"), True, [18, 36, 72]),
    ],
)
def test_has_bos_is_honoured(bos_server, content, has_bos, expected):
    which = "text_content" if isinstance(content, js.DecodeRequest.TextContent) else "token_content"
    with grpc.insecure_channel(bos_server.grpc_target) as channel:
        got = decode_ids(channel, max_tokens=len(expected), has_bos=has_bos, **{which: content})
    assert got == expected


# ---- the JetStream-only listener --------------------------------------------------------------


def health_status(channel, service=""):
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def test_jetstream_listener_needs_the_api_key_by_default():
    server, _, _ = start_mock_server(config={"jetstream_port": 0})
    try:
        endpoints = server.endpoints
        assert endpoints.jetstream_port not in (None, endpoints.grpc_port)
        with grpc.insecure_channel(f"127.0.0.1:{endpoints.jetstream_port}") as channel:
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:
                decode_ids(channel, metadata=(), token_content=tokens(1, 2, 3), max_tokens=2)
            assert e.value.code() == Code.UNAUTHENTICATED
            assert decode_ids(channel, token_content=tokens(1, 2, 3), max_tokens=2) == [6, 12]
            # only JetStream (and health) here: XlaServe is not served on this port
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.XlaServeStub(channel).GetModelInfo(
                    pb.GetModelInfoRequest(), timeout=10, metadata=AUTH
                )
            assert e.value.code() == Code.UNIMPLEMENTED
    finally:
        server.stop()


def test_jetstream_no_auth_opens_only_that_listener_and_warns(caplog):
    caplog.set_level(logging.WARNING, logger="xlaserve.serving.jetstream_listener")
    server, _, _ = start_mock_server(config={"jetstream_port": 0, "jetstream_no_auth": True})
    try:
        endpoints = server.endpoints
        with grpc.insecure_channel(f"127.0.0.1:{endpoints.jetstream_port}") as channel:
            # an unchanged JetStream client: no metadata at all
            assert decode_ids(channel, metadata=None, token_content=tokens(1, 2, 3),
                              max_tokens=2) == [6, 12]  # fmt: skip
        with grpc.insecure_channel(endpoints.grpc_target) as channel:  # the main port: still keyed
            with pytest.raises(grpc.RpcError) as e:
                decode_ids(channel, metadata=None, token_content=tokens(1, 2, 3), max_tokens=2)
            assert e.value.code() == Code.UNAUTHENTICATED
    finally:
        server.stop()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("WITHOUT an API key" in r.getMessage() for r in warnings)


def test_jetstream_api_key_is_the_listeners_own():
    config = {"jetstream_port": 0, "jetstream_api_key": "js-key"}
    server, _, _ = start_mock_server(config=config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.endpoints.jetstream_port}") as channel:
            own = (("authorization", "Bearer js-key"),)
            assert decode_ids(channel, metadata=own, token_content=tokens(1, 2, 3),
                              max_tokens=2) == [6, 12]  # fmt: skip
            with pytest.raises(grpc.RpcError) as e:  # the main key is not this listener's
                decode_ids(channel, token_content=tokens(1, 2, 3), max_tokens=2)
            assert e.value.code() == Code.UNAUTHENTICATED
    finally:
        server.stop()


def test_jetstream_config_contradictions_are_refused():
    with pytest.raises(ValueError, match="contradict"):
        ServerConfig(jetstream_port=0, jetstream_no_auth=True, jetstream_api_key="k")
    with pytest.raises(ValueError, match="jetstream_port"):
        ServerConfig(jetstream_port=70000)


# ---- undecodable gRPC bytes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, streaming",
    [
        ("/xlaserve.v1.XlaServe/GetModelInfo", False),
        ("/xlaserve.v1.XlaServe/Generate", True),
        ("/jetstream_proto.Orchestrator/Decode", True),
        ("/jetstream_proto.Orchestrator/HealthCheck", False),
    ],
)
def test_garbage_bytes_are_invalid_argument_without_a_traceback(
    bos_server, caplog, method, streaming
):
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(bos_server.grpc_target) as channel:
        make = channel.unary_stream if streaming else channel.unary_unary
        call = make(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            result = call(b"\xff\xff\xff", timeout=10, metadata=AUTH)
            if streaming:
                list(result)
    assert e.value.code() == Code.INVALID_ARGUMENT
    assert f"the request to {method} is not a valid protobuf message" in e.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# ---- HTTP ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(bos_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=bos_server.http_url, headers=headers, timeout=30) as client:
        yield client


def test_lone_surrogate_prompt_is_a_400_naming_it(http):
    # JSON's escape for a lone surrogate: json.loads gives the str "a\ud800b"
    body = '{"prompt": "a\\ud800b", "max_tokens": 2}'
    r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "prompt"
    assert "prompt is not valid Unicode text: lone surrogate" in error["message"]
    assert "position 1" in error["message"]


def test_lone_surrogate_in_a_chat_message_is_refused_naming_messages():
    from tests.serving.helpers import char_tokenizer
    from xlaserve.engine.intake import RequestIntake
    from xlaserve.errors import InvalidRequestError

    intake = RequestIntake(char_tokenizer(), vocab_size=97, max_model_len=64)
    with pytest.raises(InvalidRequestError) as info:
        intake.parse_prompt({"messages": [{"role": "user", "content": "x\udfffy"}]})
    assert info.value.param == "messages"
    assert "messages is not valid Unicode text: lone surrogate '\\udfff'" in str(info.value)
    text, ids = intake.parse_prompt({"messages": [{"role": "user", "content": "hi"}]})
    assert text == "user: hi | assistant:" and len(ids) == len(text)


def test_non_streaming_disconnect_aborts_quietly(caplog):
    caplog.set_level(logging.INFO)
    server, engine, _ = start_mock_server(delay=0.05)
    try:
        url = f"{server.endpoints.http_url}/v1/completions"
        body = {"prompt": [1, 2, 3], "max_tokens": 40}
        headers = {"Authorization": f"Bearer {API_KEY}"}

        def client_gives_up():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, json=body, headers=headers, timeout=0.3)

        worker = threading.Thread(target=client_gives_up)
        worker.start()
        worker.join(10)
        # aborted: its pages come back well before its 40 tokens (2 s) would have run
        start = time.monotonic()
        wait_until(lambda: pages_all_free(engine), timeout=5)
        assert time.monotonic() - start < 1.5
        wait_until(lambda: any("client disconnected" in r.getMessage() for r in caplog.records))
    finally:
        server.stop()
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


def test_vllm_metric_names_carry_the_right_values(http):
    before = scrape(http)
    r = http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4})
    assert r.status_code == 200
    after = scrape(http)
    model = r.json()["model"]

    def delta(name):
        return after[(name, model)] - before.get((name, model), 0.0)

    assert delta("vllm:prompt_tokens_total") == 3
    assert delta("vllm:generation_tokens_total") == 4
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == 3  # gaps between 4 tokens
    assert after[("vllm:num_requests_running", model)] == 0
    assert after[("vllm:num_requests_waiting", model)] == 0
    assert after[("vllm:kv_cache_usage_perc", model)] == 0.0
    assert after[("vllm:num_preemptions_total", model)] == 0
    # ours are still there
    assert ("xlaserve_generation_tokens_total", None) in after


def scrape(http) -> dict:
    """{(sample name, model_name label or None): value} of /metrics."""
    text = http.get("/metrics").text
    return {
        (s.name, s.labels.get("model_name")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "le" not in s.labels
    }
