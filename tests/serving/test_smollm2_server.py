"""Both servers over the real SmolLM2-135M-Instruct: our gRPC client, the official `openai`
client (streaming and not) and JetStream's Decode get exactly the tokens `LLM.generate` /
`LLM.chat` produce for greedy requests."""

import asyncio

import grpc
import openai
import pytest

from tests.conftest import ENGINE_KWARGS
from tests.serving.helpers import pages_all_free, wait_until
from xlaserve import SamplingParams
from xlaserve.config import EngineArgs
from xlaserve.engine.async_engine import AsyncEngine
from xlaserve.engine.builder import build_replica
from xlaserve.serving.client import AsyncXlaServeClient
from xlaserve.serving.proto import jetstream_pb2 as js
from xlaserve.serving.proto import jetstream_pb2_grpc as js_grpc
from xlaserve.serving.server import ServerConfig, ServerThread

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "The three primary colors are",
    "Q: What is 12 times 12?\nA:",
]
CHAT = [{"role": "user", "content": "Name a planet of the solar system."}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def reference(smollm2_llm):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2, prompt_logprobs=1)
    outputs = smollm2_llm.generate(PROMPTS, params, use_tqdm=False)
    chat = smollm2_llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                            use_tqdm=False)[0]  # fmt: skip
    return outputs, chat.outputs[0]


@pytest.fixture(scope="module")
def served(reference):
    """A server over its own engine (an engine is driven by one thread only)."""
    engine = AsyncEngine(build_replica(EngineArgs(model=MODEL, **ENGINE_KWARGS)))
    server = ServerThread(engine, ServerConfig(grpc_port=0, http_port=0))
    server.start()
    yield server.endpoints, engine
    assert server.stop() == 0


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=served[0].http_url + "/v1", api_key="unused", max_retries=0)


def ids_of(tokens):
    return [int(t.removeprefix("token_id:")) for t in tokens]


def test_grpc_client_matches_llm_generate(served, reference):
    requests, _ = reference
    endpoints, _ = served
    options = dict(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2, prompt_logprobs=1)

    async def main():
        async with AsyncXlaServeClient(endpoints.grpc_target, timeout=120) as client:
            return await asyncio.gather(*(client.generate(p, **options) for p in PROMPTS))

    for result, request in zip(asyncio.run(main()), requests, strict=True):
        assert result.prompt_token_ids == request.prompt_token_ids
        # Entry i scores prompt token i + 1 (the first one has nothing before it).
        assert len(result.prompt_logprobs) == len(request.prompt_token_ids) - 1
        for i, got in enumerate(result.prompt_logprobs):
            token, want = request.prompt_token_ids[i + 1], request.prompt_logprobs[i + 1]
            assert got[token].logprob == pytest.approx(want[token].logprob, abs=1e-4)
        ref, sample = request.outputs[0], result.samples[0]
        assert sample.token_ids == ref.token_ids
        assert sample.text == ref.text
        assert sample.finish_reason == ref.finish_reason
        for got, want, token in zip(sample.logprobs, ref.logprobs, ref.token_ids, strict=True):
            assert got[token].logprob == pytest.approx(want[token].logprob, abs=1e-4)
            top = sorted((lp.rank, t) for t, lp in got.items() if lp.rank is not None)
            assert [t for _, t in top] == sorted(
                (t for t, lp in want.items() if lp.rank is not None), key=lambda t: want[t].rank
            )


@pytest.mark.parametrize("stream", [False, True])
def test_openai_completions_match_llm_generate(oai, reference, stream):
    outputs = [o.outputs[0] for o in reference[0]]
    kwargs = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                  extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
    if stream:  # one stream per prompt (choices of a batch interleave in one stream)
        for prompt, ref in zip(PROMPTS[:2], outputs, strict=False):
            chunks = list(oai.completions.create(prompt=prompt, stream=True, **kwargs))
            tokens = [t for c in chunks for ch in c.choices for t in ch.logprobs.tokens]
            assert ids_of(tokens) == ref.token_ids
            assert "".join(ch.text for c in chunks for ch in c.choices) == ref.text
    else:
        response = oai.completions.create(prompt=PROMPTS, **kwargs)
        for choice, ref in zip(response.choices, outputs, strict=True):
            assert ids_of(choice.logprobs.tokens) == ref.token_ids
            assert choice.text == ref.text
            assert choice.finish_reason == ref.finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_matches_llm_chat(oai, reference, stream):
    _, ref = reference
    kwargs = dict(model=MODEL, messages=CHAT, max_completion_tokens=MAX_TOKENS, temperature=0,
                  logprobs=True, extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
    if stream:
        chunks = list(oai.chat.completions.create(stream=True, **kwargs))
        tokens = [e.token for c in chunks for ch in c.choices for e in ch.logprobs.content]
        text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    else:
        choice = oai.chat.completions.create(**kwargs).choices[0]
        tokens = [e.token for e in choice.logprobs.content]
        text = choice.message.content
    assert ids_of(tokens) == ref.token_ids
    assert text == ref.text


def test_seeded_sampling_matches_llm_generate(oai, smollm2_llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=MAX_TOKENS)
    want = smollm2_llm.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0]
    response = oai.completions.create(model=MODEL, prompt=PROMPTS[2], temperature=0.9,
                                      top_p=0.95, seed=1234, max_tokens=MAX_TOKENS, logprobs=0,
                                      extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
    assert ids_of(response.choices[0].logprobs.tokens) == want.token_ids


def test_jetstream_decode_matches_llm_generate(served, reference):
    outputs = [o.outputs[0] for o in reference[0]]
    endpoints, engine = served
    with grpc.insecure_channel(endpoints.grpc_target) as channel:
        stub = js_grpc.OrchestratorStub(channel)
        request = js.DecodeRequest(
            text_content=js.DecodeRequest.TextContent(text=PROMPTS[0]), max_tokens=MAX_TOKENS
        )
        responses = list(stub.Decode(request, timeout=120))
    samples = [r.stream_content.samples[0] for r in responses]
    assert [t for s in samples for t in s.token_ids] == outputs[0].token_ids
    assert "".join(s.text for s in samples) == outputs[0].text
    wait_until(lambda: pages_all_free(engine))
    assert engine.metrics()["compiles_after_warmup"] == 0
