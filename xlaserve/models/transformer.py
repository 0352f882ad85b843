"""The decoder-only transformer shared by the Llama, Qwen and Gemma families.

Layers are stored stacked (leading axis L) and run with `jax.lax.scan`, so compile time does not
grow with depth. Weights are [in, out] so activations multiply on the right.
Axis letters (docs/glossary.md): T tokens, D model, F mlp, V vocab, N q heads, K kv heads,
H head dim, L layers.
"""

from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from xlaserve.kernels_cpu import attention as cpu_attention
from xlaserve.kernels_cpu import gguf as gguf_kernel
from xlaserve.kernels_cpu import int8 as int8_kernel
from xlaserve.kernels_cpu import skinny
from xlaserve.kernels_cpu.pack import pack_for_cpu_kernel
from xlaserve.kernels_pallas.lora import lora_delta
from xlaserve.models.attention import AttentionMetadata, resolve_backend, write_and_attend
from xlaserve.models.layers import (
    RopeScaling,
    apply_rope,
    at_least_two_rows,
    fused_swiglu,
    linear,
    mrope_cos_sin,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
    swiglu,
)
from xlaserve.quantization.gguf_blocks import dequantize_rows
from xlaserve.quantization.int8 import dequantize_per_row
from xlaserve.quantization.linear import (
    WeightQuant,
    bind_quantized,
    fuse_quantized,
    packed_rows_matmul,
    quantized_rows_matmul,
)


@dataclass(frozen=True)
class TransformerConfig:
    architecture: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before rope (Qwen3)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma knobs (see models/gemma.py); the defaults are the Llama/Qwen behaviour.
    # layer_types: "sliding" or "full" per layer; empty means every layer uses sliding_window.
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # rope base of sliding layers (Gemma 3), unscaled
    hidden_act: str = "silu"  # gated MLP activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: float = 1.0  # embeddings multiplied by this (Gemma: sqrt(D))
    sandwich_norms: bool = False  # extra norms after attention and after the MLP (Gemma 2/3)
    # Checkpoint norm weights w act as (norm_weight_offset + w) (Gemma: 1); the loader folds
    # the offset into the stored weight, so the model's RMSNorm is the plain one.
    norm_weight_offset: float = 0.0
    query_pre_attn_scalar: float | None = None  # attention scale scalar**-0.5 (else H**-0.5)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Mixture of experts (see models/moe.py); num_experts 0 means a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    # M-RoPE (Qwen2.5-VL): rope frequency bands per position row; positions are then i32[3, T].
    mrope_section: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        bad = set(self.layer_types) - {"sliding", "full"}
        if bad:
            raise ValueError(f"layer_types {sorted(bad)} unknown; use 'sliding' or 'full'")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types name sliding layers but sliding_window is not set")
        if self.hidden_act not in GATED_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {GATED_ACTIVATIONS}")
        if self.mrope_section and sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = "
                             f"{self.head_dim // 2}")  # fmt: skip

    def layer_kind(self, layer: int) -> str:
        """'sliding' (attends within sliding_window) or 'full' for layer `layer`."""
        if self.layer_types:
            return self.layer_types[layer]
        return "sliding" if self.sliding_window else "full"

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return tuple(self.layer_kind(i) for i in range(self.num_layers))

    def window(self, kind: str) -> int | None:
        return self.sliding_window if kind == "sliding" else None

    def rope(self, kind: str) -> tuple[float, RopeScaling]:
        """(theta, scaling) of a layer kind: Gemma 3 sliding layers use their own base."""
        if kind == "sliding" and self.local_rope_theta is not None:
            return self.local_rope_theta, RopeScaling()
        return self.rope_theta, self.rope_scaling

    @property
    def sm_scale(self) -> float:
        scalar = self.query_pre_attn_scalar
        return (scalar if scalar is not None else self.head_dim) ** -0.5


GATED_ACTIVATIONS = ("silu", "gelu_tanh")


# Stacked per-layer parameters: name -> (HF name under model.layers.{i}., shape fn, logical axes).
# HF Linear weights are [out, in]; ours are [in, out] (transposed on load).
def layer_param_specs(c: TransformerConfig) -> dict[str, tuple[str, tuple[int, ...], tuple]]:
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    specs = {
        "attn_norm": ("input_layernorm.weight", (D,), ("embed",)),
        "wq": ("self_attn.q_proj.weight", (D, N * H), ("embed", "heads")),
        "wk": ("self_attn.k_proj.weight", (D, K * H), ("embed", "kv_heads")),
        "wv": ("self_attn.v_proj.weight", (D, K * H), ("embed", "kv_heads")),
        "wo": ("self_attn.o_proj.weight", (N * H, D), ("heads", "embed")),
        "mlp_norm": (
            "pre_feedforward_layernorm.weight"
            if c.sandwich_norms
            else "post_attention_layernorm.weight",
            (D,),
            ("embed",),
        ),  # fmt: skip
        "w_gate": ("mlp.gate_proj.weight", (D, F), ("embed", "mlp")),
        "w_up": ("mlp.up_proj.weight", (D, F), ("embed", "mlp")),
        "w_down": ("mlp.down_proj.weight", (F, D), ("mlp", "embed")),
    }
    if c.attention_bias:
        specs["bq"] = ("self_attn.q_proj.bias", (N * H,), ("heads",))
        specs["bk"] = ("self_attn.k_proj.bias", (K * H,), ("kv_heads",))
        specs["bv"] = ("self_attn.v_proj.bias", (K * H,), ("kv_heads",))
    if c.qk_norm:
        specs["q_norm"] = ("self_attn.q_norm.weight", (H,), (None,))
        specs["k_norm"] = ("self_attn.k_norm.weight", (H,), (None,))
    if c.sandwich_norms:
        specs["attn_post_norm"] = ("post_attention_layernorm.weight", (D,), ("embed",))
        specs["mlp_post_norm"] = ("post_feedforward_layernorm.weight", (D,), ("embed",))
    if c.num_experts:
        from xlaserve.models.moe import moe_param_specs

        for name in ("w_gate", "w_up", "w_down"):
            del specs[name]
        specs |= moe_param_specs(c)
    return specs


def top_param_specs(c: TransformerConfig) -> dict[str, tuple[str, tuple[int, ...], tuple]]:
    specs = {
        "embed": ("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), ("vocab", "embed")),
        "final_norm": ("model.norm.weight", (c.hidden_size,), ("embed",)),
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = ("lm_head.weight", (c.hidden_size, c.vocab_size), ("embed", "vocab"))
    return specs


NORM_PARAMS = (
    "attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm", "attn_post_norm", "mlp_post_norm",
)  # fmt: skip
BIAS_PARAMS = ("bq", "bk", "bv")


def init_value(name: str, shape: tuple[int, ...], dtype, key: jax.Array) -> jax.Array:
    if name in NORM_PARAMS:
        return jnp.ones(shape, dtype)
    if name in BIAS_PARAMS:
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class NamedParams(nnx.Module):
    """A module whose parameters are the attributes listed in `names`."""

    names: tuple[str, ...]

    def values(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


class DecoderLayers(NamedParams):
    """All decoder layers, each parameter stacked along a leading L axis."""

    def __init__(self, config: TransformerConfig, *, dtype, rngs: nnx.Rngs):
        self.names = tuple(layer_param_specs(config))
        for name, (_, shape, axes) in layer_param_specs(config).items():
            value = init_value(name, (config.num_layers, *shape), dtype, rngs.params())
            setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))


class DecoderLayer(NamedParams):
    """One layer's parameters as arrays of their own (see `Transformer.unstack_layers`)."""

    def __init__(self, values: dict[str, jax.Array], logical_axes: dict[str, tuple]):
        self.names = tuple(values)
        for name, value in values.items():
            setattr(self, name, nnx.Param(value, logical_axes=logical_axes[name]))


class Transformer(nnx.Module):
    """Decoder-only LM over a flat ragged token batch and a paged KV cache."""

    def __init__(
        self,
        config: TransformerConfig,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        attention_backend: str = "auto",
    ):
        self.config = config
        # The activations' (and unquantized weights') dtype: the one source for callers, since
        # a quantized model's embedding table holds int8 / float8 values (quantization/model.py).
        self.dtype = jnp.dtype(dtype)
        self.attention_backend = attention_backend
        self.expert_mesh = None  # a mesh with an expert axis: experts split over it (moe.py)
        for name, (_, shape, axes) in top_param_specs(config).items():
            setattr(
                self,
                name,
                nnx.Param(init_value(name, shape, dtype, rngs.params()), logical_axes=axes),
            )
        self.layers = DecoderLayers(config, dtype=dtype, rngs=rngs)
        # How the projections are stored when quantized (set at load: xlaserve/quantization).
        self.quant: WeightQuant | None = None
        # Projections packed for the CPU kernel (see `pack_for_cpu_kernel`), and the LM head's
        # packed copy (an nnx.Param) when it has one.
        self.packed: tuple[str, ...] = ()
        self.lm_head_panels = nnx.data(None)
        # The GGUF file's LM head kept in packed rows (quantization="gguf", see
        # quantization/model.py), of type quant.lm_head_type. A tied model holding them has no
        # `embed` table: its token lookup dequantizes these rows.
        self.lm_head_rows = nnx.data(None)
        # int8 / w8a8 / fp8: one f32 scale per vocabulary row of the quantized `embed` table
        # [V, D] and of an untied `lm_head`, then stored as rows [V, D] too. (Not to be confused
        # with config.embed_scale, Gemma's constant multiplier of the embeddings.)
        self.embed_scale = nnx.data(None)
        self.lm_head_scale = nnx.data(None)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        kv_cache: jax.Array,
        metadata: AttentionMetadata,
        lora_weights: dict | list | None = None,
        lora_slots: jax.Array | None = None,
        aux_layers: tuple[int, ...] = (),
        embeds_override: tuple[jax.Array, jax.Array] | None = None,
    ):
        """input_ids, positions: i32[T] (i32[3, T] with M-RoPE); kv_cache: [L, P, page_size, 2K, H].

        embeds_override (multimodal): (embeddings f32[T, D], mask bool[T]); rows where the mask
        is set take those embeddings instead of the token's (image features at placeholders).

        LoRA (optional): lora_weights maps a target module ("wq", ..., "w_down") to
        {"a": [L, I, S, R], "b": [L, S, R, O]} (stacked layers) or is a list of one such dict
        per layer without the L axis (per-layer layout); lora_slots: i32[T] each token's
        adapter slot (0 = none). See xlaserve/kernels_pallas/lora.

        Returns (updated kv_cache, final-normed hidden states [T, D]); with `aux_layers` also
        the inputs of those layers concatenated [T, len(aux_layers) * D] (EAGLE-3 features).
        """
        c = self.config
        x = self.embedding_rows(input_ids)  # [T, D]
        if c.embed_scale != 1.0:  # Gemma: the scale rounded to the weights' dtype, as HF does
            x = x * jnp.asarray(c.embed_scale, x.dtype)
        if embeds_override is not None:
            embeds, mask = embeds_override
            x = jnp.where(mask[:, None], embeds.astype(x.dtype), x)  # [T, D]
        kinds = c.layer_kinds

        def cos_sin(kind: str) -> tuple[jax.Array, jax.Array]:  # [T, H/2] each
            inv_freq = rope_inv_freq(c.head_dim, *c.rope(kind))  # host constant
            if c.mrope_section:  # positions i32[3, T] (temporal, height, width)
                return mrope_cos_sin(positions, inv_freq, c.mrope_section)
            return rope_cos_sin(positions, inv_freq)

        rope = {kind: cos_sin(kind) for kind in set(kinds)}  # kind -> (cos, sin)

        layer_fn = partial(
            decoder_layer,
            config=c,
            backend=self.attention_backend,
            expert_mesh=self.expert_mesh,
            quant=self.quant,
            packed=self.packed,
        )
        aux = []
        if isinstance(self.layers, DecoderLayers):
            # Layers of one kind share a static window; mixed kinds pick theirs per layer.
            kind = kinds[0] if len(set(kinds)) == 1 else None
            cos, sin = rope[kinds[0]] if kind else (None, None)

            def layer_step(carry, layer_inputs):
                x_in = carry[0]
                values, layer, lora = layer_inputs
                out = layer_fn(
                    *carry, values, layer, cos, sin, metadata, lora, lora_slots, rope=rope,
                    kind=kind,
                )  # fmt: skip
                return out, (x_in if aux_layers else None)

            layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
            (x, kv_cache), inputs = jax.lax.scan(
                layer_step, (x, kv_cache), (self.layers.values(), layer_ids, lora_weights)
            )
            aux = [inputs[i] for i in aux_layers]
        else:  # unstacked: one call per layer, each reading its own weight buffers
            for i, layer in enumerate(self.layers):
                if i in aux_layers:
                    aux.append(x)
                lora = None if lora_weights is None else lora_weights[i]
                cos, sin = rope[kinds[i]]
                x, kv_cache = layer_fn(
                    x, kv_cache, layer.values(), jnp.int32(i), cos, sin, metadata, lora,
                    lora_slots, kind=kinds[i],
                )  # fmt: skip
        hidden = rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        if aux_layers:
            return kv_cache, hidden, jnp.concatenate(aux, axis=-1)
        return kv_cache, hidden

    def unstack_layers(self) -> None:
        """Gives every layer's parameters arrays of their own; the layers then run unrolled.

        The q/k/v projections become one [D, (N + 2K) * H] matmul and gate/up one [D, 2F]
        matmul: fewer, wider matmuls run faster at decode batch sizes. For one device (the
        fused output axes are not sharded).

        A scan slices each layer's weights out of the stacked [L, ...] arrays. On accelerators
        the slice feeds the matmul directly, but XLA's CPU backend copies it on every step
        (about a third of a SmolLM2 decode step), while separate buffers are read in place.
        Unrolled graphs take longer to compile as depth grows, so this is for the CPU.
        """
        if not isinstance(self.layers, DecoderLayers):
            return
        stacked = self.layers
        axes = {
            name: getattr(stacked, name).get_metadata()["logical_axes"][1:]
            for name in stacked.names
        }
        values = stacked.values()
        fused = {"wqkv": ("wq", "wk", "wv")}
        if not self.config.num_experts:
            fused["w_gate_up"] = ("w_gate", "w_up")
        if self.config.attention_bias:
            fused["bqkv"] = ("bq", "bk", "bv")
        fused, self.quant = fuse_quantized(fused, self.quant)  # scales fuse with their weights
        for name, parts in fused.items():
            values[name] = jnp.concatenate([values.pop(part) for part in parts], axis=-1)
            axes[name] = axes[parts[0]][:-1] + (None,)  # the fused output axis is not sharded
        self.layers = nnx.List(
            DecoderLayer({name: array[i] for name, array in values.items()}, axes)
            for i in range(self.config.num_layers)
        )
        pack_for_cpu_kernel(self)

    def embedding_rows(self, input_ids: jax.Array) -> jax.Array:
        """The embedding table's rows [T, D] of the tokens, in the model dtype (before Gemma's
        constant scale): gathered first, so a quantized table dequantizes T rows, not V."""
        if self.embed_scale is not None:  # int8 / fp8 rows with one scale per row
            return dequantize_per_row(
                self.embed[...][input_ids], self.embed_scale[...][input_ids], self.dtype
            )
        if self.config.tie_word_embeddings and self.lm_head_rows is not None:  # GGUF blocks
            rows = self.lm_head_rows[...][input_ids]  # uint8 [T, row_bytes]
            return dequantize_rows(rows, self.quant.lm_head_type).astype(self.dtype)
        return self.embed[...][input_ids]

    @property
    def weight_copies(self) -> tuple[str, ...]:
        """Top-level parameters that hold another one's values in another layout (the packed
        LM head of a tied embedding): counted once in parameter sizes and bytes read."""
        if self.config.tie_word_embeddings and self.lm_head_panels is not None:
            return ("lm_head_panels",)
        return ()

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """Logits f32[S, V] for the selected hidden rows [S, D]."""
        if self.lm_head_panels is not None:
            logits = skinny.PackedWeight(self.lm_head_panels[...]).matmul(hidden)
            return self._soft_cap(logits.astype(jnp.float32))
        if self.lm_head_rows is not None:
            rows, qtype = self.lm_head_rows[...], self.quant.lm_head_type
            kernel = self.quant.kernel_layout and gguf_kernel.supports(qtype)
            logits = packed_rows_matmul(
                hidden.astype(self.dtype),
                rows,
                qtype,
                kernel,
                gguf_impl_for(self.attention_backend),
                self.quant.int8_activations,
            )
            return self._soft_cap(logits)
        tied = self.config.tie_word_embeddings
        scale = self.embed_scale if tied else self.lm_head_scale
        if scale is not None:  # int8 / fp8 rows [V, D], one scale per row (= output channel)
            rows = self.embed[...] if tied else self.lm_head[...]
            kernel = self.quant.kernel_layout and int8_kernel.rows_supported(rows)
            logits = quantized_rows_matmul(hidden.astype(self.dtype), rows, scale[...], kernel)
            return self._soft_cap(logits)
        weight = self.embed[...] if self.config.tie_word_embeddings else self.lm_head[...]
        rows = at_least_two_rows(hidden.astype(weight.dtype))
        # The tied embedding is [V, D]: contract its D axis directly, without a transpose.
        contract = ((1,), (1,)) if self.config.tie_word_embeddings else ((1,), (0,))
        logits = jax.lax.dot_general(
            rows, weight, (contract, ((), ())), preferred_element_type=jnp.float32
        )
        return self._soft_cap(logits[: hidden.shape[0]])

    def _soft_cap(self, logits: jax.Array) -> jax.Array:
        cap = self.config.final_logit_softcap
        if cap is not None:  # Gemma 2
            logits = cap * jnp.tanh(logits / cap)
        return logits


@partial(jax.jit, static_argnames=("config", "backend", "kind", "expert_mesh", "quant", "packed"))
def decoder_layer(
    x: jax.Array,
    kv_cache: jax.Array,
    p: dict[str, jax.Array],
    layer: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    metadata: AttentionMetadata,
    lora: dict | None = None,
    lora_slots: jax.Array | None = None,
    *,
    config: TransformerConfig,
    backend: str,
    kind: str | None = None,
    rope: dict | None = None,
    expert_mesh=None,
    quant: WeightQuant | None = None,
    packed: tuple[str, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """One decoder layer: (x [T, D], kv_cache) -> (x, kv_cache with this layer's K/V written).

    Jitted so that the unrolled CPU forward traces and lowers one layer, not one per layer
    (XLA inlines the calls, so each still reads its own weight buffers).
    lora: this layer's adapter slots per target module (see `Transformer.__call__`).
    kind: the layer's kind ("sliding" or "full", see TransformerConfig.layer_kind); None when
    kinds are mixed and the layer is a traced index inside a scan: then its (cos, sin) come
    from `rope` (kind -> (cos, sin)) and the attention picks its window with `lax.cond`.
    quant: how the projections are stored (their matmuls go through `layers.linear`).
    packed: the projections stored for the CPU kernel (xlaserve/kernels_cpu/skinny.py).
    """
    c = config
    p = skinny.bind_packed(bind_quantized(p, quant, gguf_impl_for(backend)), packed)
    num_tokens = x.shape[0]
    adapt = partial(add_lora, lora=lora, slots=lora_slots, backend=backend)
    h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)  # [T, D]
    q, k, v = project_qkv(h, p, c)  # [T, N*H], [T, K*H], [T, K*H]
    q, k, v = adapt(q, h, "wq"), adapt(k, h, "wk"), adapt(v, h, "wv")
    q = q.reshape(num_tokens, c.num_heads, c.head_dim)  # [T, N, H]
    k = k.reshape(num_tokens, c.num_kv_heads, c.head_dim)  # [T, K, H]
    v = v.reshape(num_tokens, c.num_kv_heads, c.head_dim)  # [T, K, H]
    if c.qk_norm:
        q = rms_norm(q, p["q_norm"], c.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], c.rms_norm_eps)
    if kind is None:
        is_sliding = jnp.asarray([k == "sliding" for k in c.layer_kinds])[layer]
        cos = jnp.where(is_sliding, rope["sliding"][0], rope["full"][0])  # [T, H/2]
        sin = jnp.where(is_sliding, rope["sliding"][1], rope["full"][1])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_kv = jnp.stack([k, v], axis=2).reshape(num_tokens, 2 * c.num_kv_heads, c.head_dim)
    attend = partial(
        write_and_attend, q, new_kv, kv_cache, layer, metadata, sm_scale=c.sm_scale,
        soft_cap=c.attn_logit_softcap, backend=backend,
    )  # fmt: skip
    if kind is None:
        kv_cache, attn = jax.lax.cond(
            is_sliding,
            lambda: attend(sliding_window=c.sliding_window),
            lambda: attend(sliding_window=None),
        )
    else:
        kv_cache, attn = attend(sliding_window=c.window(kind))  # attn: [T, N, H]
    attn = attn.reshape(num_tokens, c.num_heads * c.head_dim)  # [T, N*H]
    attn_out = adapt(linear(attn, p["wo"]), attn, "wo")  # [T, D]
    if c.sandwich_norms:
        attn_out = rms_norm(attn_out, p["attn_post_norm"], c.rms_norm_eps)
    x = x + attn_out
    h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
    mlp_out = mlp(h, p, c, adapt if lora is not None else None, expert_mesh)  # [T, D]
    if c.sandwich_norms:
        mlp_out = rms_norm(mlp_out, p["mlp_post_norm"], c.rms_norm_eps)
    return x + mlp_out, kv_cache


def mlp(
    h: jax.Array, p: dict[str, jax.Array], c: TransformerConfig, adapt=None, expert_mesh=None
) -> jax.Array:
    """The feed-forward block of normed h [T, D]: a gated MLP, or the experts (models/moe.py)."""
    if c.num_experts:
        from xlaserve.models.moe import moe_block

        return moe_block(h, p, c, mesh=expert_mesh)
    act = GATED_ACTIVATION_FNS[c.hidden_act]
    if adapt is not None:
        return lora_swiglu(h, p, adapt, act)
    if "w_gate_up" in p:
        return fused_swiglu(h, p["w_gate_up"], p["w_down"], act)
    return swiglu(h, p["w_gate"], p["w_up"], p["w_down"], act)


GATED_ACTIVATION_FNS = {"silu": jax.nn.silu, "gelu_tanh": partial(jax.nn.gelu, approximate=True)}


def gguf_impl_for(backend: str) -> str:
    """How GGUF packed blocks multiply beside attention `backend` (outside the CPU kernels):
    the GPU kernel with the GPU attention kernel (its interpreter on a CPU host, as the tests
    run it), XLA's dequantize-then-dot otherwise (the TPU has no GGUF kernel yet)."""
    if backend == cpu_attention.BACKEND:
        return "reference"
    return "gpu" if resolve_backend(backend) == "gpu" else "reference"


def add_lora(y, x, name: str, *, lora: dict | None, slots, backend: str) -> jax.Array:
    """y [T, O] (the base projection of x [T, I]) plus each token's adapter delta."""
    if lora is None or name not in lora:
        return y
    kernel = backend != cpu_attention.BACKEND and resolve_backend(backend) != "reference"
    delta = lora_delta(
        x, lora[name]["a"], lora[name]["b"], slots,
        impl="pallas" if kernel else "reference",
        interpret=kernel and jax.default_backend() == "cpu",
    )  # fmt: skip
    return y + delta.astype(y.dtype)


def lora_swiglu(h: jax.Array, p: dict[str, jax.Array], adapt, act=jax.nn.silu) -> jax.Array:
    """swiglu (fused or not) with adapter deltas on gate, up and down."""
    if "w_gate_up" in p:
        gate, up = jnp.split(linear(h, p["w_gate_up"]), 2, axis=-1)  # [T, F] each
    else:
        gate, up = linear(h, p["w_gate"]), linear(h, p["w_up"])
    act = act(adapt(gate, h, "w_gate")) * adapt(up, h, "w_up")  # [T, F]
    return adapt(linear(act, p["w_down"]), act, "w_down")  # [T, D]


def project_qkv(h: jax.Array, p: dict[str, jax.Array], c: TransformerConfig):
    """q [T, N*H], k and v [T, K*H] from the normed hidden states [T, D] (fused or not)."""
    if "wqkv" not in p:
        q, k, v = linear(h, p["wq"]), linear(h, p["wk"]), linear(h, p["wv"])
        if c.attention_bias:
            q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
        return q, k, v
    qkv = linear(h, p["wqkv"])
    if c.attention_bias:
        qkv = qkv + p["bqkv"]
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return jnp.split(qkv, [q_width, q_width + kv_width], axis=-1)
