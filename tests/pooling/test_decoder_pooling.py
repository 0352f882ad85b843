"""Decoder pooling (last token / mean over the generative forward) and sequence-classification
heads (`*ForSequenceClassification`) against transformers' own classes, random tiny weights,
float32 on both sides."""

import numpy as np
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen3Config,
    Qwen3ForSequenceClassification,
)

from tests.models.tiny_configs import COMMON, save_tiny_model
from xlaserve import LLM, InvalidRequestError
from xlaserve.engine.intake import RequestIntake
from xlaserve.pooling import PoolingParams

# Hidden states reach a few units; float32 summation order differs (measured ~1e-6).
ATOL = 2e-5
LENGTHS = (1, 7, 16, 33, 100)
# Few token buckets (32, 64, 128): compiling dominates these tests.
ENGINE = dict(dtype="float32", max_num_seqs=4, max_model_len=128, min_token_bucket=32)


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in LENGTHS]


def hidden_states(hf_model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model.model(torch.tensor([ids])).last_hidden_state[0].numpy()  # [T, D]


@pytest.fixture(scope="module", params=["llama3", "qwen3"])
def decoder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = save_tiny_model(request.param, folder)
    return hf_model, LLM(str(folder), runner="pooling", **ENGINE)


def test_last_token_and_mean_pooling_match_transformers(decoder):
    hf_model, llm = decoder
    batch = prompts(COMMON["vocab_size"])
    raw = dict(normalize=False)
    last = llm.embed([{"prompt_token_ids": p} for p in batch], PoolingParams(**raw),
                     use_tqdm=False)  # fmt: skip
    mean = llm.embed([{"prompt_token_ids": p} for p in batch],
                     PoolingParams(pooling_type="MEAN", **raw), use_tqdm=False)  # fmt: skip
    unit = llm.embed([{"prompt_token_ids": p} for p in batch], use_tqdm=False)  # defaults
    for ids, o_last, o_mean, o_unit in zip(batch, last, mean, unit, strict=True):
        h = hidden_states(hf_model, ids)
        np.testing.assert_allclose(o_last.outputs.embedding, h[-1], atol=ATOL)
        np.testing.assert_allclose(o_mean.outputs.embedding, h.mean(0), atol=ATOL)
        # Default for a decoder embedder: last token, L2-normalized (Qwen3-Embedding style).
        np.testing.assert_allclose(
            o_unit.outputs.embedding, h[-1] / np.linalg.norm(h[-1]), atol=ATOL
        )
    assert llm.get_metrics()["compiles_after_warmup"] == 0
    assert llm.get_metrics()["kv_pages_free"] == llm.get_metrics()["kv_pages_total"]


def test_generative_intake_refuses_pooling_requests():
    # The intake of an engine built for generation (pooler None), as every front uses it.
    intake = RequestIntake(None, vocab_size=100, max_model_len=64)
    with pytest.raises(InvalidRequestError) as e:
        intake.process("r", [1, 2, 3], PoolingParams(), arrival_time=0.0)
    assert e.value.param == "model"
    assert "generation" in str(e.value)


def test_explicit_generate_runner_refuses_a_classifier(tmp_path):
    folder = tmp_path / "cls"
    CLASSIFIERS["llama"][0](LlamaConfig(**COMMON, num_labels=2)).save_pretrained(folder)
    with pytest.raises(ValueError, match="LlamaForSequenceClassification cannot generate"):
        LLM(str(folder), runner="generate", **ENGINE)


CLASSIFIERS = {
    "llama": (LlamaForSequenceClassification, LlamaConfig,
              dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": (Qwen3ForSequenceClassification, Qwen3Config,
              dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(CLASSIFIERS))
def classifier(request, tmp_path_factory):
    model_cls, config_cls, extra = CLASSIFIERS[request.param]
    torch.manual_seed(0)
    config = config_cls(**COMMON, **extra, num_labels=3, pad_token_id=0)
    config.id2label = {0: "neg", 1: "neutral", 2: "pos"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    hf_model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                    else 0.15 * torch.randn_like(p))  # fmt: skip
    folder = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(folder)
    return hf_model, LLM(str(folder), **ENGINE)  # runner "pooling" chosen from the architecture


def test_sequence_classification_matches_transformers(classifier):
    hf_model, llm = classifier
    batch = [[t if t else 1 for t in p] for p in prompts(COMMON["vocab_size"], seed=1)]
    probs = llm.classify([{"prompt_token_ids": p} for p in batch], use_tqdm=False)
    rewards = llm.reward([{"prompt_token_ids": p} for p in batch], use_tqdm=False)
    for ids, p, r in zip(batch, probs, rewards, strict=True):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0].numpy()  # [3]
        np.testing.assert_allclose(r.outputs.data, logits, atol=ATOL)
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(p.outputs.probs, expected, atol=1e-5)
    assert llm.engine.pooler.labels == ("neg", "neutral", "pos")
    with pytest.raises(InvalidRequestError) as e:
        llm.embed({"prompt_token_ids": [1, 2]}, use_tqdm=False)
    assert e.value.param == "task"
