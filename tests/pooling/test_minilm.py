"""all-MiniLM-L6-v2 embeddings against sentence-transformers' own `encode` on the same folder:
cosine >= 0.9999 on 52 sentences (short, past the 256-token limit with truncation, non-ASCII,
one batch of mixed lengths), pooling overrides, refusals, and no compile after warm-up."""

import numpy as np
import pytest

from tests.pooling.sentences import ALL, LONG, MIXED, NON_ASCII, SHORT
from xlaserve import InvalidRequestError, SamplingParams
from xlaserve.pooling import PoolingParams

MIN_COSINE = 0.9999
TRUNCATE = PoolingParams(truncate_prompt_tokens=-1)  # cut at the model's limit (256)


def cosines(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)


def embeddings(outputs) -> np.ndarray:
    return np.array([o.outputs.embedding for o in outputs])


@pytest.fixture(scope="module")
def reference(minilm_st):
    return dict(zip(ALL, minilm_st.encode(ALL, batch_size=64), strict=True))


@pytest.mark.parametrize(
    "name, sentences", [("short", SHORT), ("non_ascii", NON_ASCII), ("long", LONG)]
)
def test_embeddings_match_sentence_transformers(minilm_llm, reference, name, sentences):
    ours = embeddings(minilm_llm.embed(sentences, TRUNCATE, use_tqdm=False))
    ref = np.array([reference[s] for s in sentences])
    assert ours.shape == (len(sentences), 384)
    assert cosines(ours, ref).min() >= MIN_COSINE
    # The model's folder ends with a Normalize module: unit vectors, as sentence-transformers.
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


def test_mixed_batch_matches_and_compiles_nothing(minilm_llm, reference):
    before = minilm_llm.get_metrics()
    ours = embeddings(minilm_llm.embed(MIXED, TRUNCATE, use_tqdm=False))
    ref = np.array([reference[s] for s in MIXED])
    assert cosines(ours, ref).min() >= MIN_COSINE
    after = minilm_llm.get_metrics()
    assert after["compiles_after_warmup"] == before["compiles_after_warmup"] == 0
    assert after["steps"] - before["steps"] >= 4  # 52 requests over max_num_seqs=16
    assert after["kv_pages_free"] == after["kv_pages_total"]


def test_every_length_up_to_the_limit_without_compiles(minilm_llm):
    vocab_ids = list(range(2000, 2256))
    prompts = [{"prompt_token_ids": [101, *vocab_ids[: n - 2], 102]} for n in range(2, 257, 9)]
    minilm_llm.embed(prompts, use_tqdm=False)
    assert minilm_llm.get_metrics()["compiles_after_warmup"] == 0


def test_overrides_cls_pooling_and_no_normalize(minilm_llm, minilm_st):
    text = SHORT[:4]
    tokens = minilm_st.encode(text, output_value="token_embeddings")
    cls = embeddings(minilm_llm.embed(text, PoolingParams(pooling_type="CLS"), use_tqdm=False))
    ref_cls = np.array([t[0].numpy() for t in tokens])
    assert cosines(cls, ref_cls).min() >= MIN_COSINE
    raw = embeddings(minilm_llm.embed(text, PoolingParams(normalize=False), use_tqdm=False))
    ref_mean = np.array([t.numpy().mean(0) for t in tokens])
    np.testing.assert_allclose(raw, ref_mean, rtol=1e-3, atol=1e-4)
    assert np.all(np.abs(np.linalg.norm(raw, axis=-1) - 1.0) > 1e-2)


def test_token_ids_and_text_agree(minilm_llm):
    ids = minilm_llm.get_tokenizer()(SHORT[2])["input_ids"]
    by_text, by_ids = minilm_llm.embed([SHORT[2], {"prompt_token_ids": ids}], use_tqdm=False)
    np.testing.assert_allclose(by_text.outputs.embedding, by_ids.outputs.embedding, atol=1e-6)
    assert by_text.prompt_token_ids == ids


def test_score_is_cosine_of_embeddings(minilm_llm, reference):
    out = minilm_llm.score(SHORT[1], [SHORT[1], SHORT[2], SHORT[6]], use_tqdm=False)
    a = reference[SHORT[1]]
    expected = [cosines(a, reference[s]) for s in (SHORT[1], SHORT[2], SHORT[6])]
    np.testing.assert_allclose([o.outputs.score for o in out], expected, atol=1e-4)


@pytest.mark.parametrize(
    "call, param",
    [
        (lambda llm: llm.embed([], use_tqdm=False), "prompt"),
        (lambda llm: llm.embed("", use_tqdm=False), "prompt"),
        (lambda llm: llm.embed(LONG[-1], use_tqdm=False), "prompt"),  # 525 tokens, no truncation
        (lambda llm: llm.embed(3.5, use_tqdm=False), "prompt"),
        (lambda llm: llm.embed("x", PoolingParams(dimensions=64), use_tqdm=False), "dimensions"),
        (lambda llm: llm.embed("x", truncate_prompt_tokens=1000, use_tqdm=False),
         "truncate_prompt_tokens"),
        (lambda llm: llm.classify("x", use_tqdm=False), "task"),
        (lambda llm: llm.generate("x", SamplingParams(max_tokens=2), use_tqdm=False), "model"),
    ],
    ids=["empty_list", "empty_string", "too_long", "wrong_type", "dimensions_not_matryoshka",
         "truncate_past_limit", "classify_on_embedder", "generate_on_pooling_model"],
)  # fmt: skip
def test_bad_input_is_refused_naming_the_field(minilm_llm, call, param):
    with pytest.raises(InvalidRequestError) as e:
        call(minilm_llm)
    assert e.value.param == param
    assert not minilm_llm.engine.has_unfinished_requests()
    assert minilm_llm.embed("still serving", use_tqdm=False)[0].outputs.data.shape == (384,)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(dimensions="3"), "dimensions"),
        (dict(dimensions=0), "dimensions"),
        (dict(normalize="yes"), "normalize"),
        (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
        (dict(pooling_type="MAX"), "pooling_type"),
    ],
)
def test_pooling_params_validation(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        PoolingParams(**kwargs)
    assert e.value.param == param
