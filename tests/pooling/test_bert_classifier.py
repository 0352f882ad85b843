"""BERT sequence classifiers (random tiny weights, MiniLM's tokenizer) against transformers'
`BertForSequenceClassification`: a one-label cross-encoder's pair scores (token type ids 1 on
the second text) and a three-label classifier's probabilities."""

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from xlaserve import LLM, InvalidRequestError
from xlaserve.pooling import PoolingParams

ATOL = 2e-5
ENGINE = dict(dtype="float32", max_num_seqs=4, max_model_len=128, max_num_batched_tokens=128,
              min_token_bucket=32)  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")  # fmt: skip
QUERY = "how do embeddings work"
DOCS = [
    "Embeddings map text to vectors.",
    "The weather is nice today in the city.",
    "Ünïcödé pair: 日本語",
]


def save_classifier(folder, minilm_path, num_labels: int) -> BertForSequenceClassification:
    torch.manual_seed(num_labels)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, num_labels=num_labels,
                        max_position_embeddings=512)  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" not in name:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path / name, folder / name)
    return model


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory, minilm_path):
    folder = tmp_path_factory.mktemp("cross_encoder")
    hf_model = save_classifier(folder, minilm_path, num_labels=1)
    return hf_model, AutoTokenizer.from_pretrained(folder), LLM(str(folder), **ENGINE)


def hf_logits(hf_model, tokenizer, *texts) -> np.ndarray:
    with torch.no_grad():
        return hf_model(**tokenizer(*texts, return_tensors="pt")).logits[0].numpy()


def test_cross_encoder_scores_match_transformers(cross_encoder):
    hf_model, tokenizer, llm = cross_encoder
    scores = llm.score(QUERY, DOCS, use_tqdm=False)
    for doc, out in zip(DOCS, scores, strict=True):
        logit = hf_logits(hf_model, tokenizer, QUERY, doc)[0]
        np.testing.assert_allclose(out.outputs.score, 1 / (1 + np.exp(-logit)), atol=1e-6)
    # The same pair without the token types of its second text scores differently: they count.
    swapped = llm.score(DOCS[0], QUERY, use_tqdm=False)[0].outputs.score
    assert abs(swapped - scores[0].outputs.score) > 1e-4
    raw = llm.score(QUERY, DOCS[0], PoolingParams(activation=False), use_tqdm=False)
    expected = hf_logits(hf_model, tokenizer, QUERY, DOCS[0])[0]
    np.testing.assert_allclose(raw[0].outputs.score, expected, atol=ATOL)


def test_cross_encoder_refuses_what_it_cannot_do(cross_encoder):
    _, _, llm = cross_encoder
    with pytest.raises(InvalidRequestError) as e:
        llm.score([QUERY, QUERY], DOCS, use_tqdm=False)  # 2 against 3
    assert e.value.param == "text_2"
    with pytest.raises(InvalidRequestError) as e:
        llm.embed(QUERY, use_tqdm=False)
    assert e.value.param == "task"
    with pytest.raises(InvalidRequestError) as e:
        llm.score(QUERY, DOCS[0], PoolingParams(normalize=True), use_tqdm=False)
    assert e.value.param == "normalize"


def test_three_label_classifier_matches_transformers(tmp_path, minilm_path):
    hf_model = save_classifier(tmp_path, minilm_path, num_labels=3)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    llm = LLM(str(tmp_path), **ENGINE)
    outs = llm.classify(DOCS, use_tqdm=False)
    for doc, out in zip(DOCS, outs, strict=True):
        logits = hf_logits(hf_model, tokenizer, doc)
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(out.outputs.probs, expected, atol=1e-5)
    assert llm.get_metrics()["compiles_after_warmup"] == 0
