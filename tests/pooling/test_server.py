"""The pooling endpoints of a real server on MiniLM: the official openai client's
`embeddings.create` (float and base64) against sentence-transformers, token-id inputs,
/v1/score and /v1/rerank, gRPC Embed, bad inputs as 400s naming the field (INVALID_ARGUMENT on
gRPC), and each kind of server refusing the other kind's requests."""

import base64

import grpc
import httpx
import numpy as np
import openai
import pytest

from tests.pooling.sentences import LONG, MIXED, NON_ASCII, SHORT
from tests.serving.helpers import API_KEY, AUTH, start_mock_server
from xlaserve.config import EngineArgs
from xlaserve.engine.async_engine import AsyncEngine
from xlaserve.engine.builder import build_engine
from xlaserve.serving.proto import xlaserve_pb2 as pb
from xlaserve.serving.proto import xlaserve_pb2_grpc as pb_grpc
from xlaserve.serving.server import ServerConfig, ServerThread

MODEL = "minilm"
KEY = {"Authorization": f"Bearer {API_KEY}"}
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def server(minilm_path):
    engine = build_engine(EngineArgs(model=str(minilm_path), dtype="float32", max_num_seqs=16))
    config = ServerConfig(grpc_port=0, http_port=0, api_key=API_KEY, served_model_name=MODEL)
    thread = ServerThread(AsyncEngine(engine), config)
    thread.start()
    yield thread.endpoints
    thread.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, headers=KEY, timeout=60) as c:
        yield c


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def decoded(embedding) -> np.ndarray:
    if isinstance(embedding, str):  # base64 asked for explicitly: the client hands it over as is
        return np.frombuffer(base64.b64decode(embedding), "<f4")
    return np.asarray(embedding)


TEXTS = SHORT[:8] + NON_ASCII[:4] + MIXED[:8]


@pytest.fixture(scope="module")
def reference(minilm_st):
    return minilm_st.encode(TEXTS)


# None: the client's default, which asks for base64 and decodes it itself.
@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_openai_client_embeddings_match_sentence_transformers(
    client, minilm_st, reference, encoding_format
):
    texts = TEXTS
    fmt = {} if encoding_format is None else {"encoding_format": encoding_format}
    result = client.embeddings.create(
        model=MODEL, input=texts, extra_body={"truncate_prompt_tokens": -1}, **fmt
    )
    ours = np.array([decoded(d.embedding) for d in result.data])
    assert [d.index for d in result.data] == list(range(len(texts)))
    assert cosines(ours, reference).min() >= MIN_COSINE
    tokenizer = minilm_st.tokenizer
    expected_tokens = sum(min(len(tokenizer(t)["input_ids"]), 256) for t in texts)
    assert result.usage.prompt_tokens == result.usage.total_tokens == expected_tokens


def test_base64_carries_the_same_float32_values(http):
    body = {"model": MODEL, "input": SHORT[:3]}
    floats = http.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    b64 = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), "<f4")
        # The two requests may be batched differently: float32 summation order only.
        np.testing.assert_allclose(decoded, np.asarray(f["embedding"], np.float32), atol=1e-6)


def test_token_id_inputs(client, minilm_st):
    ids = [minilm_st.tokenizer(t)["input_ids"] for t in SHORT[:3]]
    many = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    one = client.embeddings.create(model=MODEL, input=ids[0], encoding_format="float")
    ref = minilm_st.encode(SHORT[:3])
    assert cosines([d.embedding for d in many.data], ref).min() >= MIN_COSINE
    assert cosines(one.data[0].embedding, ref[0]) >= MIN_COSINE


def test_score_and_rerank(http, minilm_st):
    query, docs = SHORT[12], [SHORT[0], SHORT[12], SHORT[10], SHORT[3]]
    ref = minilm_st.encode([query, *docs])
    expected = cosines(ref[0], ref[1:])
    score = http.post("/v1/score", json={"model": MODEL, "text_1": query, "text_2": docs})
    assert score.status_code == 200, score.text
    np.testing.assert_allclose([d["score"] for d in score.json()["data"]], expected, atol=1e-4)
    rerank = http.post("/v1/rerank", json={"query": query, "documents": docs, "top_n": 2})
    assert rerank.status_code == 200, rerank.text
    results = rerank.json()["results"]
    assert [r["index"] for r in results] == list(np.argsort(-expected)[:2])
    assert results[0]["document"]["text"] == docs[results[0]["index"]]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/embeddings", {"input": []}, "input"),
        ("/v1/embeddings", {"input": ""}, "input"),
        ("/v1/embeddings", {"input": 5}, "input"),
        ("/v1/embeddings", {"input": [[]]}, "input"),
        ("/v1/embeddings", {"input": [[1, 2], "mixed"]}, "input"),
        ("/v1/embeddings", {"input": LONG[-1]}, "input"),  # 525 tokens, no truncation asked
        ("/v1/embeddings", {"input": "x", "dimensions": 64}, "dimensions"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ("/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ("/v1/embeddings", {"input": [99999]}, "input"),
        ("/v1/score", {"text_1": "a", "text_2": []}, "text_2"),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_2"),
        ("/v1/rerank", {"query": "a", "documents": []}, "documents"),
        ("/v1/rerank", {"query": "a", "documents": ["b"], "top_n": 0}, "top_n"),
    ],
)
def test_bad_inputs_are_400_naming_the_field(http, path, body, param):
    r = http.post(path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert http.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="Matryoshka"):
        client.embeddings.create(model=MODEL, input="x", dimensions=64)


def test_pooling_server_refuses_completions(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "model"
    assert "served for pooling" in r.json()["error"]["message"]


def test_generative_server_refuses_embeddings():
    server, _, _ = start_mock_server()
    try:
        with httpx.Client(base_url=server.endpoints.http_url, headers=KEY, timeout=30) as c:
            for path, body in [("/v1/embeddings", {"input": "hi"}),
                               ("/v1/rerank", {"query": "a", "documents": ["b"]})]:  # fmt: skip
                r = c.post(path, json=body)
                assert r.status_code == 400, r.text
                assert r.json()["error"]["param"] == "model"
                assert "text generation" in r.json()["error"]["message"]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.XlaServeStub(channel)


def test_grpc_embed_matches_sentence_transformers(stub, minilm_st, reference):
    request = pb.EmbedRequest(model=MODEL, texts=TEXTS, truncate_prompt_tokens=-1)
    response = stub.Embed(request, metadata=AUTH, timeout=60)
    ours = np.array([e.values for e in response.embeddings])
    assert [e.index for e in response.embeddings] == list(range(len(TEXTS)))
    assert cosines(ours, reference).min() >= MIN_COSINE
    assert response.prompt_tokens == sum(e.prompt_tokens for e in response.embeddings) > 0
    ids = minilm_st.tokenizer(SHORT[0])["input_ids"]
    by_ids = stub.Embed(pb.EmbedRequest(token_ids=[pb.TokenIds(ids=ids)]), metadata=AUTH)
    assert cosines(by_ids.embeddings[0].values, reference[0]) >= MIN_COSINE


@pytest.mark.parametrize(
    "request_kwargs, words",
    [
        (dict(), "input is empty"),
        (dict(texts=[""]), "empty"),
        (dict(texts=[LONG[-1]]), "max_model_len"),
        (dict(texts=["x"], dimensions=64), "Matryoshka"),
        (dict(texts=["x"], task="classify"), "task"),
        (dict(texts=["x"], token_ids=[pb.TokenIds(ids=[1])]), "not both"),
    ],
)
def test_grpc_embed_bad_input_is_invalid_argument(stub, request_kwargs, words):
    with pytest.raises(grpc.RpcError) as e:
        stub.Embed(pb.EmbedRequest(**request_kwargs), metadata=AUTH, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in e.value.details()


def test_grpc_generative_server_refuses_embed():
    server, _, _ = start_mock_server()
    try:
        with grpc.insecure_channel(server.endpoints.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.XlaServeStub(channel).Embed(pb.EmbedRequest(texts=["hi"]), metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "text generation" in e.value.details()
    finally:
        server.stop()
