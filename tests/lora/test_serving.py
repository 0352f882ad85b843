"""LoRA adapters over the servers, on the real SmolLM2: the official `openai` client picks an
adapter by model name (completions and chat), /v1/models lists adapters with their parent,
adapters load, serve, unload and reload with other weights at run time over HTTP and gRPC,
JetStream's lora_adapter_id routes to an adapter; every output equals `LLM.generate` /
`LLM.chat` under the same adapter."""

import asyncio

import grpc
import httpx
import openai
import pytest

from tests.lora.conftest import PROMPTS
from tests.serving.helpers import API_KEY, AUTH
from xlaserve import LoRARequest, SamplingParams
from xlaserve.engine.async_engine import AsyncEngine
from xlaserve.serving.client import XlaServeClient
from xlaserve.serving.context import ServerConfig, ServingContext
from xlaserve.serving.errors import Kind, ServingError
from xlaserve.serving.proto import jetstream_pb2 as js
from xlaserve.serving.proto import jetstream_pb2_grpc as js_grpc
from xlaserve.serving.server import ServerThread

pytestmark = pytest.mark.slow  # the SmolLM2 LoRA engine and its adapters (shared, see conftest)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
CHAT = [{"role": "user", "content": "Name a planet of the solar system."}]


@pytest.fixture(scope="module")
def expected(lora_llm, smollm2_adapters):
    """Offline outputs under each adapter, before the server takes the engine's thread."""
    out = {}
    for name in ("attn8", "attn8-other"):
        lora = LoRARequest(f"offline-{name}", 50 + len(out), smollm2_adapters[name].path)
        gen = lora_llm.generate(PROMPTS[0], GREEDY, use_tqdm=False, lora_request=lora)[0]
        chat = lora_llm.chat(CHAT, GREEDY, use_tqdm=False, lora_request=lora)[0]
        out[name] = (gen.outputs[0], chat.outputs[0].text)
    base = lora_llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0]
    out["base"] = (base, None)
    return out


@pytest.fixture(scope="module")
def server(lora_llm, smollm2_adapters, expected):
    config = ServerConfig(grpc_port=0, http_port=0, api_key=API_KEY,
                          allow_runtime_lora_loading=True,
                          lora_modules=(("sql", smollm2_adapters["attn8"].path),))  # fmt: skip
    thread = ServerThread(AsyncEngine(lora_llm.engine), config)  # the engine's one thread now
    thread.start()
    yield thread.endpoints
    assert thread.stop() == 0


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0)


def complete(oai, model):
    r = oai.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    return r.model, r.choices[0].text


def test_models_lists_adapters_with_their_parent(oai):
    cards = {m.id: m for m in oai.models.list().data}
    base = "smollm2-135m-instruct"
    assert cards["sql"].parent == base and base in cards
    assert getattr(cards[base], "parent", None) is None


def test_completions_and_chat_by_adapter_name(oai, expected):
    model, text = complete(oai, "sql")
    assert (model, text) == ("sql", expected["attn8"][0].text)
    assert complete(oai, "smollm2-135m-instruct")[1] == expected["base"][0].text
    assert expected["attn8"][0].text != expected["base"][0].text
    chat = oai.chat.completions.create(model="sql", messages=CHAT, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == expected["attn8"][1]
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        complete(oai, "nope")


def test_load_use_unload_and_reload_with_other_weights(server, oai, smollm2_adapters, expected):
    url, key = server.http_url, {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=url, headers=key, timeout=60) as http:
        body = {"lora_name": "hot", "lora_path": smollm2_adapters["attn8-other"].path}
        r = http.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 200, r.text
        assert complete(oai, "hot")[1] == expected["attn8-other"][0].text
        r = http.post("/v1/load_lora_adapter", json=body)  # the name exists
        assert r.status_code == 400 and "already served" in r.json()["error"]["message"]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "hot"}).status_code == 200
        with pytest.raises(openai.NotFoundError, match="'hot' does not exist"):
            complete(oai, "hot")
        # Reloaded under the same name with other weights: the new weights' output (and no
        # KV from the old ones: the prefix cache keys pages by the weights).
        body["lora_path"] = smollm2_adapters["attn8"].path
        assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
        assert complete(oai, "hot")[1] == expected["attn8"][0].text
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "hot"}).status_code == 200
        # Bad requests: a missing folder, an unknown name, no API key.
        bad = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/no/such"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
        assert "/no/such" in bad.json()["error"]["message"]
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "never"})
        assert gone.status_code == 404
        assert httpx.post(url + "/v1/load_lora_adapter", json=body).status_code == 401
    assert complete(oai, "sql")[1] == expected["attn8"][0].text  # still serving


def test_grpc_lora_name_and_load_unload_rpcs(server, smollm2_adapters, expected):
    with XlaServeClient(server.grpc_target, api_key=API_KEY, timeout=60) as client:
        got = client.generate(PROMPTS[0], lora_name="sql", max_tokens=8, temperature=0.0)
        assert got.token_ids == expected["attn8"][0].token_ids
        info = client.load_lora_adapter("g", smollm2_adapters["attn8-other"].path)
        assert info.lora_name == "g" and info.rank == 8 and len(info.identity) == 64
        got = client.generate(PROMPTS[0], lora_name="g", max_tokens=8, temperature=0.0)
        assert got.token_ids == expected["attn8-other"][0].token_ids
        client.unload_lora_adapter("g")
        with pytest.raises(grpc.RpcError) as e:
            client.generate(PROMPTS[0], lora_name="g", max_tokens=8)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            client.load_lora_adapter("h", "/no/such/folder")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "/no/such/folder" in e.value.details()


def test_jetstream_lora_adapter_id_routes_to_the_adapter(server, lora_llm, expected):
    ids = lora_llm.get_tokenizer()(PROMPTS[0])["input_ids"]
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = js_grpc.OrchestratorStub(channel)
        request = js.DecodeRequest(token_content=js.DecodeRequest.TokenContent(token_ids=ids),
                                   max_tokens=8, lora_adapter_id="sql")  # fmt: skip
        got = [t for r in stub.Decode(request, timeout=60, metadata=AUTH)
               for t in r.stream_content.samples[0].token_ids]  # fmt: skip
    assert got == expected["attn8"][0].token_ids


def test_runtime_loading_is_off_unless_enabled():
    ctx = ServingContext(None, ServerConfig(grpc_port=None, http_port=None))
    with pytest.raises(ServingError, match="--allow-runtime-lora-loading") as e:
        asyncio.run(ctx.load_adapter("a", "/x"))
    assert e.value.kind is Kind.NOT_FOUND
