"""Both servers over the mock engine (exact tokens): our gRPC client, the official `openai`
client (streaming and not), JetStream's Orchestrator, health, reflection, model info, metrics."""

import asyncio

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.engine.mock_runner import reference_output
from tests.serving.helpers import API_KEY, AUTH, char_tokenizer, run_alone, start_mock_server
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.serving.client import AsyncXlaServeClient, XlaServeClient
from xlaserve.serving.proto import jetstream_pb2 as js
from xlaserve.serving.proto import jetstream_pb2_grpc as js_grpc

TOKEN_PROMPTS = [[1, 2, 3], [91, 3, 3], [50, 60], [7] * 10]
TEXT_PROMPTS = ["Hi", "Hello there", "abc", "Why?"]


@pytest.fixture(scope="module")
def server():
    server, engine, runner = start_mock_server(max_num_seqs=8)
    yield server.endpoints
    assert server.stop() == 0


@pytest.fixture(scope="module")
def grpc_client(server):
    with XlaServeClient(server.grpc_target, api_key=API_KEY, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0)


def token_ids(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


@pytest.mark.parametrize("prompt", TOKEN_PROMPTS + TEXT_PROMPTS)
def test_grpc_client_gets_the_offline_tokens(grpc_client, prompt):
    params = SamplingParams(temperature=0.0, max_tokens=8)
    alone = run_alone(prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt}, params)
    result = grpc_client.generate(prompt, temperature=0.0, max_tokens=8)
    assert result.token_ids == alone.outputs[0].token_ids
    assert result.text == alone.outputs[0].text
    assert result.samples[0].finish_reason == alone.outputs[0].finish_reason
    assert result.prompt_token_ids == alone.prompt_token_ids
    if not isinstance(prompt, str):  # hand-checked rule; [91, 3, 3] sums to 97 -> eos
        assert result.token_ids == reference_output(prompt, params, max_model_len=64,
                                                    eos_token_ids=(0,))[0]  # fmt: skip
    assert result.usage["completion_tokens"] == len(result.token_ids)


def test_grpc_stream_sends_deltas_logprobs_and_n(grpc_client):
    responses = list(
        grpc_client.generate_stream([1, 2, 3], n=2, max_tokens=5, logprobs=1, ignore_eos=True)
    )
    assert responses[0].prompt_token_ids == [1, 2, 3] and responses[-1].finished
    for index in (0, 1):
        ids = [t for r in responses for s in r.samples if s.index == index for t in s.token_ids]
        assert ids == [6, 12, 24, 48, 96]
    last = {s.index: s for r in responses for s in r.samples}
    assert last[0].finish_reason == "length" and last[0].cumulative_logprob == pytest.approx(
        -(6 % 10 + 12 % 10 + 24 % 10 + 48 % 10 + 96 % 10) / 10
    )
    first_lp = responses[0].samples[0].logprobs[0]
    assert (first_lp.token.token_id, first_lp.token.logprob, first_lp.token.rank) == (6, -0.6, 1)
    assert responses[-1].usage.completion_tokens == 10


def test_stop_strings_and_stop_tokens_over_grpc(grpc_client):
    # "Hi" -> "1C" ...: tokens 18, 36, 72, 47 (144 % 97) -> "1Cg" + chr(78)="N"
    alone = run_alone("Hi", SamplingParams(max_tokens=6))
    text = alone.outputs[0].text
    assert text.startswith("1CgN")
    stopped = grpc_client.generate("Hi", max_tokens=6, stop=["gN"])
    assert (stopped.text, stopped.samples[0].stop_reason) == ("1C", "gN")
    kept = grpc_client.generate("Hi", max_tokens=6, stop=["gN"], include_stop_str_in_output=True)
    assert kept.text == "1CgN"
    by_token = grpc_client.generate("Hi", max_tokens=6, stop_token_ids=[72])
    assert by_token.token_ids == [18, 36, 72] and by_token.samples[0].stop_reason == 72


def test_async_client_and_abort(server):
    async def main():
        async with AsyncXlaServeClient(server.grpc_target, api_key=API_KEY, timeout=30) as c:
            result = await c.generate({"prompt_token_ids": [1, 2, 3]}, max_tokens=4)
            assert result.token_ids == [6, 12, 24, 48]
            assert not await c.abort("nothing-by-this-id")
            info = await c.model_info()
            assert (info.model_name, info.max_model_len, info.vocab_size) == ("mock", 64, 97)
            assert (info.page_size, info.num_kv_pages, list(info.eos_token_ids)) == (4, 64, [0])
            assert await c.health() == "SERVING"

    asyncio.run(main())


@pytest.mark.parametrize("prompt", [[1, 2, 3], "Hello there"])
@pytest.mark.parametrize("stream", [False, True])
def test_openai_completions_get_the_offline_tokens(oai, prompt, stream):
    alone = run_alone(
        prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt},
        SamplingParams(temperature=0.0, max_tokens=7),
    ).outputs[0]
    kwargs = dict(model="mock", prompt=prompt, max_tokens=7, temperature=0, logprobs=0,
                  extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
    if stream:
        chunks = list(oai.completions.create(stream=True, **kwargs))
        tokens = [t for c in chunks for ch in c.choices for t in ch.logprobs.tokens]
        text = "".join(ch.text for c in chunks for ch in c.choices)
        finish = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    else:
        response = oai.completions.create(**kwargs)
        tokens, text = response.choices[0].logprobs.tokens, response.choices[0].text
        finish = [response.choices[0].finish_reason]
        assert response.usage.completion_tokens == len(alone.token_ids)
    assert token_ids(tokens) == alone.token_ids
    assert text == alone.text
    assert finish == [alone.finish_reason]


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_gets_the_offline_tokens(oai, stream):
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]
    text = char_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False)  # fmt: skip
    alone = run_alone({"prompt": text}, SamplingParams(temperature=0.0, max_tokens=9)).outputs[0]
    kwargs = dict(model="mock", messages=messages, max_completion_tokens=9, temperature=0,
                  logprobs=True, top_logprobs=1, stream_options=None,
                  extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
    if stream:
        kwargs["stream_options"] = {"include_usage": True}
        chunks = list(oai.chat.completions.create(stream=True, **kwargs))
        assert chunks[0].choices[0].delta.role == "assistant"
        tokens = [e.token for c in chunks for ch in c.choices for e in ch.logprobs.content]
        content = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
        assert chunks[-1].usage.completion_tokens == len(alone.token_ids)
    else:
        response = oai.chat.completions.create(**kwargs)
        tokens = [e.token for e in response.choices[0].logprobs.content]
        content = response.choices[0].message.content
        assert response.choices[0].logprobs.content[0].top_logprobs[0].logprob == pytest.approx(
            -(alone.token_ids[0] % 10) / 10
        )
    assert token_ids(tokens) == alone.token_ids
    assert content == alone.text


def test_openai_batched_prompts_and_n(oai):
    response = oai.completions.create(model="mock", prompt=[[1, 2, 3], [50, 60]], n=2,
                                      max_tokens=3, temperature=0)  # fmt: skip
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.usage.prompt_tokens == 5 and response.usage.completion_tokens == 12


def test_models_health_and_metrics(server, oai, grpc_client):
    assert [m.id for m in oai.models.list().data] == ["mock"]
    assert httpx.get(server.http_url + "/health").json() == {"status": "SERVING"}
    grpc_client.generate([1, 2, 3], max_tokens=2)
    text = httpx.get(server.http_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    for name in ("xlaserve_requests_total{outcome=\"length\"}", "xlaserve_kv_pages_total 64.0",
                 "xlaserve_time_to_first_token_seconds_count", "xlaserve_num_requests_running",
                 "xlaserve_prefix_cache_hit_rate", "xlaserve_compiles_total",
                 "xlaserve_e2e_request_latency_seconds_bucket",
                 "xlaserve_time_per_output_token_seconds_sum"):  # fmt: skip
        assert name in text.text
    assert text.headers["content-type"].startswith("text/plain")


def test_grpc_health_reflection_and_jetstream(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "xlaserve.v1.XlaServe", "jetstream_proto.Orchestrator"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        orchestrator = js_grpc.OrchestratorStub(channel)
        assert orchestrator.HealthCheck(js.HealthCheckRequest(), timeout=10).is_live
        # JetStream's benchmark: token ids in, token ids out (greedy), metadata set.
        request = js.DecodeRequest(
            token_content=js.DecodeRequest.TokenContent(token_ids=[1, 2, 3]),
            max_tokens=4,
            metadata=js.DecodeRequest.Metadata(start_time=1.0),
        )
        responses = list(orchestrator.Decode(request, timeout=10, metadata=AUTH))
        assert [t for r in responses for t in r.stream_content.samples[0].token_ids] == [
            6, 12, 24, 48
        ]  # fmt: skip
        text = "".join(
            r.stream_content.samples[0].text
            for r in orchestrator.Decode(
                js.DecodeRequest(
                    text_content=js.DecodeRequest.TextContent(text="Hi"), max_tokens=3, priority=0
                ),
                timeout=10,
                metadata=AUTH,
            )  # fmt: skip
        )
        assert text == "1Cg"
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=AUTH
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert {"xlaserve.v1.XlaServe", "jetstream_proto.Orchestrator",
                "grpc.health.v1.Health"} <= names  # fmt: skip


def test_openai_stop_strings_stream_without_retracting_text(oai):
    # "Hi" -> "1CgN...": the held-back "g" is never sent once "gN" matches.
    chunks = list(oai.completions.create(model="mock", prompt="Hi", max_tokens=6, stop="gN",
                                         stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == "1C"
    assert chunks[-1].choices[0].finish_reason == "stop"
