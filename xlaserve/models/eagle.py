"""EAGLE draft heads: one decoder layer that drafts from the target's hidden states.

- EAGLE (-1): x = fc([embed(token); feature]) (+ bias), one Llama layer whose input norm is
  absent, no final norm; the target's LM head turns x into logits. The feature is the target's
  final (normed) hidden state at the previous position, or the head's own output while drafting.
- EAGLE-3: the target feature is three of its layers' hidden states concatenated, reduced by fc
  (3D -> D); the layer attends over [input_norm(embed(token)); hidden_norm(feature)] (2D wide),
  its output goes through a final norm and the head's own LM head over a draft vocabulary, whose
  ids map to the target's through `d2t` (target id = draft id + d2t[draft id]).

Pure functions over a params dict; K/V live in a one-layer paged cache laid over the target's
page tables. Axis letters: T tokens, D hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.models.attention import AttentionMetadata, write_and_attend
from xlaserve.models.layers import (
    RopeScaling,
    apply_rope,
    linear,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
    swiglu,
)


@dataclass(frozen=True)
class EagleConfig:
    method: str  # "eagle" or "eagle3"
    hidden_size: int  # D
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    input_norm: bool = False  # EAGLE-1 checkpoints that keep layer 0's input norm
    fc_bias: bool = False
    draft_vocab_size: int | None = None  # EAGLE-3
    aux_layers: tuple[int, ...] = ()  # EAGLE-3: target layers whose inputs are the feature

    @property
    def feature_size(self) -> int:
        """Width of the target feature fc takes (with the embedding for EAGLE-1)."""
        return 3 * self.hidden_size if self.method == "eagle3" else 2 * self.hidden_size


def forward(
    params: dict,
    config: EagleConfig,
    embed: Callable[[jax.Array], jax.Array],
    tokens: jax.Array,
    feature: jax.Array,
    positions: jax.Array,
    kv_cache: jax.Array,
    metadata: AttentionMetadata,
    attention_backend: str = "reference",
) -> tuple[jax.Array, jax.Array]:
    """(kv_cache, out [T, D]): the head's hidden state after the token at each position.
    `feature` is the target's feature [T, 3D or D] (EAGLE-3) / [T, D], or the head's own
    previous output [T, D]. embed: token ids [T] -> their embedding rows [T, D]."""
    c = config
    emb = embed(tokens).astype(jnp.float32)
    feature = feature.astype(jnp.float32)
    if c.method == "eagle":
        x = linear(jnp.concatenate([emb, feature], axis=-1), params["fc"])
        if c.fc_bias:
            x = x + params["fc_bias"]
        h = rms_norm(x, params["attn_norm"], c.rms_norm_eps) if c.input_norm else x
        residual = x
    else:
        if feature.shape[-1] != c.hidden_size:
            feature = linear(feature, params["fc"])
        h = jnp.concatenate(
            [rms_norm(emb, params["attn_norm"], c.rms_norm_eps),
             rms_norm(feature, params["hidden_norm"], c.rms_norm_eps)], axis=-1
        )  # fmt: skip
        residual = feature
    num_tokens = tokens.shape[0]
    q = linear(h, params["wq"]).reshape(num_tokens, c.num_heads, c.head_dim)
    k = linear(h, params["wk"]).reshape(num_tokens, c.num_kv_heads, c.head_dim)
    v = linear(h, params["wv"]).reshape(num_tokens, c.num_kv_heads, c.head_dim)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_kv = jnp.stack([k, v], axis=2).reshape(num_tokens, 2 * c.num_kv_heads, c.head_dim)
    kv_cache, attn = write_and_attend(
        q, new_kv.astype(kv_cache.dtype), kv_cache, jnp.int32(0), metadata,
        sm_scale=c.head_dim**-0.5, backend=attention_backend,
    )  # fmt: skip
    x = residual + linear(attn.reshape(num_tokens, -1).astype(jnp.float32), params["wo"])
    h = rms_norm(x, params["mlp_norm"], c.rms_norm_eps)
    return kv_cache, x + swiglu(h, params["w_gate"], params["w_up"], params["w_down"])


def param_shapes(c: EagleConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes ([in, out] matrices)."""
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    attn_in = 2 * D if c.method == "eagle3" else D
    shapes = {
        "fc": (c.feature_size if c.method == "eagle" else 3 * D, D),
        "wq": (attn_in, N * H),
        "wk": (attn_in, K * H),
        "wv": (attn_in, K * H),
        "wo": (N * H, D),
        "mlp_norm": (D,),
        "w_gate": (D, F),
        "w_up": (D, F),
        "w_down": (F, D),
    }
    if c.fc_bias:
        shapes["fc_bias"] = (D,)
    if c.input_norm or c.method == "eagle3":
        shapes["attn_norm"] = (D,)
    if c.method == "eagle3":
        shapes.update(hidden_norm=(D,), final_norm=(D,), lm_head=(D, c.draft_vocab_size),
                      d2t=(c.draft_vocab_size,))  # fmt: skip
    return shapes


def to_device(params: dict[str, np.ndarray], dtype) -> dict[str, jax.Array]:
    return {
        name: jnp.asarray(value, jnp.int32 if name == "d2t" else dtype)
        for name, value in params.items()
    }
