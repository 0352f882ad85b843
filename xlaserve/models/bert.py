"""BERT family encoders (`BertModel`, `BertForSequenceClassification`): bidirectional attention,
absolute position and token-type embeddings, post-LayerNorm layers, no KV cache. Used by the
pooling runner (embeddings, cross-encoder scores).

The batch is dense, [S, L]: S sequences each padded to L tokens (the pooling runner groups a
step's sequences by length bucket, so padding stays under 2x). Each token attends to the real
tokens of its own sequence; attention costs S * L^2, not (S * L)^2 as a packed batch would.
Weights are [in, out]. Axis letters (docs/glossary.md): S sequences, L positions, D model,
F mlp, V vocab, N heads, H head dim, C classifier labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ARCHITECTURES = ("BertModel", "BertForSequenceClassification")


@dataclass(frozen=True)
class BertConfig:
    architecture: str
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # N
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_labels: int = 0  # C: > 0 for BertForSequenceClassification (pooler + classifier)
    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = ()  # an encoder never stops on a token

    @property
    def head_dim(self) -> int:  # H
        return self.hidden_size // self.num_heads

    @property
    def has_classifier(self) -> bool:
        return self.num_labels > 0


def config_from_hf(hf: dict) -> BertConfig:
    arch = hf["architectures"][0]
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"BERT hidden_act {hf['hidden_act']!r} is not supported (only 'gelu')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"BERT position_embedding_type {hf['position_embedding_type']!r} is not supported "
            "(only 'absolute')"
        )
    if hf["hidden_size"] % hf["num_attention_heads"]:
        raise ValueError("BERT hidden_size must be a multiple of num_attention_heads")
    num_labels = 0
    if arch == "BertForSequenceClassification":
        num_labels = len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))
    return BertConfig(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        num_labels=num_labels,
        pad_token_id=hf.get("pad_token_id") or 0,
    )


# name -> (HF name, shape); HF Linear weights are [out, in], ours [in, out].
def top_param_specs(c: BertConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    D = c.hidden_size
    specs = {
        "word_embed": ("embeddings.word_embeddings.weight", (c.vocab_size, D)),
        "pos_embed": ("embeddings.position_embeddings.weight", (c.max_position_embeddings, D)),
        "type_embed": ("embeddings.token_type_embeddings.weight", (c.type_vocab_size, D)),
        "embed_norm_w": ("embeddings.LayerNorm.weight", (D,)),
        "embed_norm_b": ("embeddings.LayerNorm.bias", (D,)),
    }
    if c.has_classifier:  # BertForSequenceClassification: tanh pooler on [CLS], then classifier
        specs["pooler_w"] = ("pooler.dense.weight", (D, D))
        specs["pooler_b"] = ("pooler.dense.bias", (D,))
    return specs


def head_param_specs(c: BertConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    if not c.has_classifier:
        return {}
    return {
        "classifier_w": ("classifier.weight", (c.hidden_size, c.num_labels)),
        "classifier_b": ("classifier.bias", (c.num_labels,)),
    }


def layer_param_specs(c: BertConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    D, F = c.hidden_size, c.intermediate_size
    return {
        "wq": ("attention.self.query.weight", (D, D)),
        "bq": ("attention.self.query.bias", (D,)),
        "wk": ("attention.self.key.weight", (D, D)),
        "bk": ("attention.self.key.bias", (D,)),
        "wv": ("attention.self.value.weight", (D, D)),
        "bv": ("attention.self.value.bias", (D,)),
        "wo": ("attention.output.dense.weight", (D, D)),
        "bo": ("attention.output.dense.bias", (D,)),
        "attn_norm_w": ("attention.output.LayerNorm.weight", (D,)),
        "attn_norm_b": ("attention.output.LayerNorm.bias", (D,)),
        "w_in": ("intermediate.dense.weight", (D, F)),
        "b_in": ("intermediate.dense.bias", (F,)),
        "w_out": ("output.dense.weight", (F, D)),
        "b_out": ("output.dense.bias", (D,)),
        "mlp_norm_w": ("output.LayerNorm.weight", (D,)),
        "mlp_norm_b": ("output.LayerNorm.bias", (D,)),
    }


# Checkpoint buffers derived from the config, not parameters.
IGNORED_TENSORS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _prefix(c: BertConfig) -> str:
    return "bert." if c.has_classifier else ""


def expected_hf_tensors(c: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds, with its HF shape. A `BertModel` saved
    without its pooler (sentence-transformers folders often are) loads too: the pooler is only
    used by the classifier."""
    p = _prefix(c)
    expected = {p + hf: _hf_shape(n, shape) for n, (hf, shape) in top_param_specs(c).items()}
    expected.update({hf: _hf_shape(n, shape) for n, (hf, shape) in head_param_specs(c).items()})
    for name, (hf, shape) in layer_param_specs(c).items():
        for i in range(c.num_layers):
            expected[f"{p}encoder.layer.{i}.{hf}"] = _hf_shape(name, shape)
    return expected


EMBEDDINGS = ("word_embed", "pos_embed", "type_embed")  # [rows, D] in both layouts


def _hf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1] if len(shape) == 2 and name not in EMBEDDINGS else shape


def unused_hf_tensors(c: BertConfig, tensors: dict) -> list[str]:
    """Tensors a checkpoint may carry that this model does not use (dropped at load)."""
    p = _prefix(c)
    optional = [p + name for name in IGNORED_TENSORS]
    if not c.has_classifier:
        optional += ["pooler.dense.weight", "pooler.dense.bias"]
    return [name for name in optional if name in tensors]


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32, cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (normed * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x [M, in] @ w [in, out] + b, accumulated in float32, in x's dtype."""
    out = jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return (out + b.astype(jnp.float32)).astype(x.dtype)


def fuse_qkv(values: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """One layer's parameters with q/k/v as one [D, 3D] matmul (one wide matmul runs faster
    than three narrow ones on the CPU); the layout is fixed at load."""
    values = dict(values)
    values["wqkv"] = jnp.concatenate([values.pop(n) for n in ("wq", "wk", "wv")], axis=-1)
    values["bqkv"] = jnp.concatenate([values.pop(n) for n in ("bq", "bk", "bv")], axis=-1)
    return values


class BertLayer(nnx.Module):
    """One encoder layer's parameters (arrays of their own: read in place on the CPU)."""

    def __init__(self, values: dict[str, jax.Array]):
        values = fuse_qkv(values)
        self.names = tuple(values)
        for name, value in values.items():
            setattr(self, name, nnx.Param(value))

    def values(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


def encoder_layer(x: jax.Array, p: dict, key_mask: jax.Array, c: BertConfig) -> jax.Array:
    """x [S, L, D], key_mask bool[S, L] (real tokens) -> x [S, L, D]."""
    S, L, N, H = x.shape[0], x.shape[1], c.num_heads, c.head_dim
    flat = x.reshape(S * L, -1)  # [S*L, D]
    qkv = dense(flat, p["wqkv"], p["bqkv"]).reshape(S, L, 3, N, H)  # [S, L, 3, N, H]
    q = qkv[:, :, 0].transpose(0, 2, 1, 3) * H**-0.5  # [S, N, L, H]
    k = qkv[:, :, 1].transpose(0, 2, 3, 1)  # [S, N, H, L]
    v = qkv[:, :, 2].transpose(0, 2, 1, 3)  # [S, N, L, H]
    # Batched matmuls on explicitly transposed operands, and the softmax's division after the
    # value product ([S, N, L, H] instead of [S, N, L, L] divides): 4-5x faster on XLA's CPU
    # backend than the same attention as two einsums and jax.nn.softmax (measured at
    # S=8, L=256), equal to 1e-6.
    bias = jnp.where(key_mask, 0.0, -1e30)[:, None, None, :]  # [S, 1, 1, L]
    scores = jnp.matmul(q, k, preferred_element_type=jnp.float32) + bias  # [S, N, L, L]
    weights = jnp.exp(scores - scores.max(-1, keepdims=True))
    attn = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    attn = attn / weights.sum(-1, keepdims=True)  # [S, N, L, H]
    attn = attn.transpose(0, 2, 1, 3).reshape(S * L, N * H).astype(x.dtype)
    attn = dense(attn, p["wo"], p["bo"])  # [S*L, D]
    flat = layer_norm(flat + attn, p["attn_norm_w"], p["attn_norm_b"], c.layer_norm_eps)
    h = jax.nn.gelu(dense(flat, p["w_in"], p["b_in"]), approximate=False)  # [S*L, F]
    flat = layer_norm(flat + dense(h, p["w_out"], p["b_out"]), p["mlp_norm_w"],
                      p["mlp_norm_b"], c.layer_norm_eps)  # fmt: skip
    return flat.reshape(S, L, -1)


class BertModel(nnx.Module):
    """The encoder trunk (plus, for a classifier, the [CLS] pooler and the classifier)."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        for name, (_, shape) in {**top_param_specs(config), **head_param_specs(config)}.items():
            setattr(self, name, nnx.Param(_init(name, shape, dtype, rngs.params())))
        self.layers = nnx.List(
            BertLayer(
                {
                    name: _init(name, shape, dtype, rngs.params())
                    for name, (_, shape) in layer_param_specs(config).items()
                }
            )
            for _ in range(config.num_layers)
        )

    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array, lengths: jax.Array
    ) -> jax.Array:
        """input_ids, token_type_ids: i32[S, L] (each row a sequence from position 0, padded);
        lengths: i32[S] real tokens per row (0 for a padding row).

        Returns the last layer's hidden states [S, L, D]."""
        c = self.config
        L = input_ids.shape[1]
        x = (
            self.word_embed[...][input_ids]
            + self.pos_embed[...][:L][None]
            + self.type_embed[...][token_type_ids]
        )  # [S, L, D]
        x = layer_norm(x, self.embed_norm_w[...], self.embed_norm_b[...], c.layer_norm_eps)
        key_mask = jnp.arange(L)[None, :] < lengths[:, None]  # [S, L]
        for layer in self.layers:
            x = encoder_layer(x, layer.values(), key_mask, c)
        return x

    def classify(self, cls_hidden: jax.Array) -> jax.Array:
        """Classifier logits f32[R, C] from the [CLS] hidden states [R, D]."""
        pooled = jnp.tanh(dense(cls_hidden, self.pooler_w[...], self.pooler_b[...]))  # [R, D]
        logits = dense(pooled, self.classifier_w[...], self.classifier_b[...])
        return logits.astype(jnp.float32)


def _init(name: str, shape: tuple[int, ...], dtype, key: jax.Array) -> jax.Array:
    if name.endswith("norm_w"):
        return jnp.ones(shape, dtype)
    if len(shape) == 1:
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def model_from_hf_tensors(
    config: BertConfig, tensors: dict[str, np.ndarray], dtype, source: str
) -> BertModel:
    """A BertModel holding a checkpoint's tensors (validated: every expected tensor present
    with its shape, nothing unaccounted for), built without a random init."""
    from xlaserve.checkpoints.loader import check_tensors

    tensors = dict(tensors)
    for name in unused_hf_tensors(config, tensors):
        tensors.pop(name)
    check_tensors(expected_hf_tensors(config), tensors, source)
    model = nnx.eval_shape(lambda: BertModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
    jdtype = jnp.dtype(dtype)

    def ours(name: str, array: np.ndarray) -> jax.Array:
        dense = array.ndim == 2 and name not in EMBEDDINGS  # HF Linear [out, in] -> [in, out]
        return jnp.asarray(array.T if dense else array, dtype=jdtype)

    p = _prefix(config)
    for name, (hf, _) in top_param_specs(config).items():
        getattr(model, name).set_value(ours(name, tensors[p + hf]))
    for name, (hf, _) in head_param_specs(config).items():
        getattr(model, name).set_value(ours(name, tensors[hf]))
    specs = layer_param_specs(config)
    for i, layer in enumerate(model.layers):
        values = {name: ours(name, tensors[f"{p}encoder.layer.{i}.{hf}"])
                  for name, (hf, _) in specs.items()}  # fmt: skip
        for name, value in fuse_qkv(values).items():
            getattr(layer, name).set_value(value)
    return model
