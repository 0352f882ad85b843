"""Pooling models from their folders, in their final form with their pooling defaults (which
runner a model gets is runner_choice.py's).

- Encoders (`BertModel`, `BertForSequenceClassification`): models/bert.py.
- Decoder classifiers (`LlamaForSequenceClassification`, `Qwen2/3ForSequenceClassification`):
  the decoder trunk (models/transformer.py, the same forward as generation) plus the `score`
  head [D, C], applied to the last token.
- Decoder embedders (`*ForCausalLM` with runner "pooling", e.g. Qwen3-Embedding): the decoder
  trunk; the LM head, if stored, is not used. Any format the generative loader reads (HF
  folder, GGUF, orbax, dummy) works.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.checkpoints import hf
from xlaserve.checkpoints.loader import (
    has_tokenizer_files,
    load_model,
    model_from_hf_tensors,
    resolve_dtype,
)
from xlaserve.checkpoints.tokenizer import load_tokenizer
from xlaserve.models import bert
from xlaserve.models.attention import resolve_backend
from xlaserve.pooling.model_config import PoolerConfig, pooler_config_for
from xlaserve.pooling.runner_choice import DECODER_CLASSIFIERS, ENCODER_ARCHITECTURES, hf_folder

assert set(bert.ARCHITECTURES) == set(ENCODER_ARCHITECTURES)


@dataclass
class LoadedPoolingModel:
    """trunk: a BertModel (encoder) or a decoder Transformer; head: the decoder classifier's
    {"score": [D, C]} (None for embedders; BERT keeps its classifier inside the model)."""

    trunk: object
    config: object  # BertConfig | TransformerConfig
    head: dict[str, jax.Array] | None
    pooler: PoolerConfig
    tokenizer: object | None
    dtype: jnp.dtype

    @property
    def is_encoder(self) -> bool:
        return isinstance(self.config, bert.BertConfig)


def load_pooling_model(
    model: str,
    *,
    load_format: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    attention_backend: str = "auto",
    layer_layout: str = "stacked",
) -> LoadedPoolingModel:
    """The pooling model `model` names, in its final form (as `load_model` for decoders)."""
    resolve_backend(attention_backend)
    folder = hf_folder(model) if load_format in ("auto", "hf") else None
    hf_config = hf.read_config(folder) if folder else {}
    archs = hf_config.get("architectures") or []
    if any(a in bert.ARCHITECTURES for a in archs):
        return _load_bert(folder, hf_config, dtype)
    classifier = next((a for a in archs if a in DECODER_CLASSIFIERS), None)
    if folder is not None:
        return _load_decoder_folder(folder, hf_config, classifier, dtype, attention_backend,
                                    layer_layout)  # fmt: skip
    loaded = load_model(model, load_format=load_format, dtype=dtype, seed=seed,
                        attention_backend=attention_backend, layer_layout=layer_layout)  # fmt: skip
    c = loaded.config
    pooler = pooler_config_for(None, {}, hidden_size=c.hidden_size, num_labels=0, decoder=True)
    return LoadedPoolingModel(loaded.model, c, None, pooler, loaded.tokenizer, loaded.dtype)


def _load_bert(folder: Path, hf_config: dict, dtype: str) -> LoadedPoolingModel:
    arch = next(a for a in hf_config["architectures"] if a in bert.ARCHITECTURES)
    config = bert.config_from_hf({**hf_config, "architectures": [arch]})
    jdtype = resolve_dtype(dtype)
    model = bert.model_from_hf_tensors(config, hf.read_tensors(folder), jdtype, str(folder))
    pooler = pooler_config_for(folder, hf_config, hidden_size=config.hidden_size,
                               num_labels=config.num_labels, decoder=False)  # fmt: skip
    tokenizer = load_tokenizer(folder) if has_tokenizer_files(folder) else None
    return LoadedPoolingModel(model, config, None, pooler, tokenizer, jdtype)


def _load_decoder_folder(
    folder: Path, hf_config: dict, classifier: str | None, dtype, attention_backend, layout
) -> LoadedPoolingModel:
    tensors = hf.read_tensors(folder)
    # Checkpoints saved from the bare trunk (Qwen3-Embedding) name tensors without "model.".
    if "embed_tokens.weight" in tensors:
        tensors = {
            (name if name.startswith(("score.", "lm_head.")) else f"model.{name}"): value
            for name, value in tensors.items()
        }
    tensors.pop("lm_head.weight", None)  # pooling never computes next-token logits
    head = None
    if classifier is not None:
        score = tensors.pop("score.weight", None)
        if score is None:
            raise ValueError(f"{folder}: {classifier} checkpoint has no score.weight")
        if "score.bias" in tensors:
            raise ValueError(f"{folder}: a score head with a bias is not supported")
        head = {"score": np.ascontiguousarray(score.T)}  # [D, C]
    arch = DECODER_CLASSIFIERS.get(classifier) or next(iter(hf_config["architectures"]), "")
    # The trunk is built tied: no LM head is expected (and none is used).
    trunk_config = {**hf_config, "architectures": [arch], "tie_word_embeddings": True}
    jdtype = resolve_dtype(dtype)
    model, config = model_from_hf_tensors(trunk_config, tensors, jdtype, str(folder))
    model.attention_backend = attention_backend
    if layout == "per_layer":
        model.unstack_layers()
    num_labels = 0 if head is None else head["score"].shape[1]
    if head is not None:
        head = {"score": jnp.asarray(head["score"], jdtype)}
    pooler = pooler_config_for(folder, hf_config, hidden_size=config.hidden_size,
                               num_labels=num_labels, decoder=True)  # fmt: skip
    tokenizer = load_tokenizer(folder) if has_tokenizer_files(folder) else None
    return LoadedPoolingModel(model, replace(config, architecture=classifier or arch), head,
                              pooler, tokenizer, jdtype)  # fmt: skip
