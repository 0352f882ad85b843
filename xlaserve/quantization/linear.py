"""The quantized-linear hook: `QuantizedWeight` carries its values, scales and kind, and
`models/layers.linear` hands it the matmul.

Weights are stored as plain arrays in the model's parameters (so sharding rules, the layer
scan and the per-layer layout treat them like any weight): the projection `name` holds the
quantized values and, for int8/w8a8/fp8, `name + "_scale"` holds f32[out]. `bind_quantized`
turns one layer's parameter dict into the view the layer math uses.
"""

import dataclasses
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from xlaserve.kernels_cpu import gguf as gguf_kernel
from xlaserve.kernels_cpu import int8 as int8_kernel
from xlaserve.kernels_pallas.gguf_matmul import gguf_matmul
from xlaserve.quantization.int8 import quantize_per_token, quantize_per_token_fp8

# The decoder's projection matmuls (and their fused forms in the per-layer layout).
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}
SCALE_SUFFIX = "_scale"
# w8a8 keeps these projections' activations in the model dtype (int8 weights, w8a16): the
# input of the down projection (the SwiGLU product) spans the widest range within a token,
# and one int8 scale per token for it cost SmolLM2 2.3% -> 3.8% perplexity (measured on
# tests/quantization/data/english.txt against bfloat16: 2.3% with it weight-only).
W8A8_WEIGHT_ONLY = ("w_down",)


@dataclass(frozen=True)
class WeightQuant:
    """How a model's projections are stored (a static, hashable part of the model).

    method: "int8" | "w8a8" | "fp8" | "gguf". gguf_types: (name, GGML type) of each projection
    kept packed (fused names included); projections not listed hold plain weights.
    kernel_layout: the quantized projections are laid out for the CPU kernels (see
    xlaserve/kernels_cpu/pack.py): GGUF rows uint8[out, row_bytes] instead of
    uint8[row_bytes, out]; int8 panels int8[out / 16, in / lanes, 16 * lanes] instead of
    int8[in, out].
    lm_head_type: the GGML type of the LM head's packed rows (`Transformer.lm_head_rows`,
    uint8[V, row_bytes]) when the GGUF file's head stays packed; None otherwise.
    fp8_activations: fp8 projections quantize their activations per token to float8_e4m3fn
    and multiply fp8 x fp8 (set at load where the device has fp8 matmul units:
    quantization/model.fp8_matmul_supported); weight-only otherwise.
    int8_activations: GGUF matmuls (projections and packed LM head) quantize their
    activations to int8 per run of 32 values (quantization="gguf_a8").
    """

    method: str
    gguf_types: tuple[tuple[str, int], ...] = ()
    kernel_layout: bool = False
    lm_head_type: int | None = None
    fp8_activations: bool = False
    int8_activations: bool = False

    def gguf_type(self, name: str) -> int | None:
        return dict(self.gguf_types).get(name)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedWeight:
    """values: int8 / float8 [in, out] with scale f32[out], or GGUF packed rows
    uint8 [row_bytes, out] (one column per output channel) with scale None; in the CPU
    kernels' layout where `kernel_layout` (see WeightQuant). gguf_impl: how GGUF blocks
    multiply outside the CPU kernels (kernels_pallas/gguf_matmul: "reference" or "gpu").
    int8_activations: a GGUF weight's activations are quantized per 32 values (gguf_a8)."""

    values: jax.Array
    scale: jax.Array | None
    method: str = field(metadata=dict(static=True))
    gguf_type: int | None = field(default=None, metadata=dict(static=True))
    kernel_layout: bool = field(default=False, metadata=dict(static=True))
    gguf_impl: str = field(default="reference", metadata=dict(static=True))
    int8_activations: bool = field(default=False, metadata=dict(static=True))

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [M, in] @ self -> [M, out] in x's dtype, accumulated in f32 (int32 for w8a8)."""
        if self.kernel_layout:
            return self._kernel_matmul(x).astype(x.dtype)
        if self.method == "gguf":
            return _gguf_matmul(
                x, self.values, self.gguf_type, self.gguf_impl, self.int8_activations
            ).astype(x.dtype)
        rows = jnp.concatenate([x, x]) if x.shape[0] == 1 else x  # see layers.at_least_two_rows
        if self.method in ("w8a8", "fp8_dynamic"):
            # Activations quantized per token (int8 x int8 -> int32; fp8 x fp8 -> f32).
            quantize, acc_type = {
                "w8a8": (quantize_per_token, jnp.int32),
                "fp8_dynamic": (quantize_per_token_fp8, jnp.float32),
            }[self.method]
            xq, x_scale = quantize(rows)  # [M, in], f32 [M, 1]
            acc = jax.lax.dot_general(
                xq, self.values, (((1,), (0,)), ((), ())), preferred_element_type=acc_type
            )  # [M, out]
            out = acc.astype(jnp.float32) * x_scale * self.scale
        else:  # int8 / fp8 weight-only: values widened to the activations' dtype
            out = jnp.dot(rows, self.values.astype(x.dtype), preferred_element_type=jnp.float32)
            out = out * self.scale
        return out[: x.shape[0]].astype(x.dtype)

    def _kernel_matmul(self, x: jax.Array) -> jax.Array:
        """The CPU kernels' product: the same scaling as the XLA path above, and for w8a8
        the same int32 sums, bit for bit."""
        if self.method == "gguf":
            planar = self.int8_activations and gguf_kernel.planar(self.gguf_type, x.shape[1])
            return gguf_kernel.matmul(x, self.values, self.gguf_type, self.int8_activations, planar)
        if self.method == "w8a8":
            xq, x_scale = quantize_per_token(x)
            acc = int8_kernel.panels_matmul(xq, self.values, "w8a8")
            return acc.astype(jnp.float32) * x_scale * self.scale
        return int8_kernel.panels_matmul(x, self.values, self.method) * self.scale


def packed_rows_matmul(
    x: jax.Array,
    rows: jax.Array,
    qtype: int,
    kernel: bool,
    gguf_impl: str = "reference",
    int8_activations: bool = False,
) -> jax.Array:
    """x [M, in] @ GGUF rows uint8[out, row_bytes] -> f32 [M, out]: on the CPU kernel, or
    through kernels_pallas/gguf_matmul (`gguf_impl`) reading the rows as they lie."""
    if kernel:
        return gguf_kernel.matmul(x, rows, qtype, int8_activations)
    return _gguf_matmul(x, rows, qtype, gguf_impl, int8_activations, rows=True)


def _gguf_matmul(
    x, packed, qtype: int, impl: str, int8_activations: bool, rows: bool = False
) -> jax.Array:
    interpret = impl != "reference" and jax.default_backend() == "cpu"
    return gguf_matmul(x, packed, qtype, rows=rows, impl=impl, interpret=interpret,
                       int8_activations=int8_activations)  # fmt: skip


def quantized_rows_matmul(
    x: jax.Array, rows: jax.Array, scale: jax.Array, kernel: bool
) -> jax.Array:
    """x [M, D] @ rows.T * scale -> f32 [M, V]: the LM head of an int8 / w8a8 / fp8 model,
    whose rows [V, D] (int8 or float8_e4m3fn) carry one scale f32[V] per vocabulary row.

    The head is weight-only in every mode (w8a8 too: the logits are the most
    precision-sensitive product). The rows are widened to x's dtype (exact: 8-bit values fit
    bfloat16) and contracted on D directly, without a transpose; on the CPU kernel (int8
    rows, `kernel`) the same product with x rounded to bfloat16."""
    if kernel:
        return int8_kernel.rows_matmul(x, rows) * scale
    out = jax.lax.dot_general(
        at_least_two_rows(x), rows.astype(x.dtype), (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    return out[: x.shape[0]] * scale


def at_least_two_rows(x: jax.Array) -> jax.Array:  # see models/layers.at_least_two_rows
    return jnp.concatenate([x, x]) if x.shape[0] == 1 else x


def bind_quantized(
    p: dict[str, jax.Array], quant: WeightQuant | None, gguf_impl: str = "reference"
) -> dict:
    """One layer's parameters with each quantized projection as a `QuantizedWeight`."""
    if quant is None:
        return p
    out = dict(p)
    for name in (*PROJECTIONS, *FUSED):
        if name not in p:
            continue
        if quant.method == "gguf":
            qtype = quant.gguf_type(name)
            if qtype is not None:
                out[name] = QuantizedWeight(
                    p[name], None, "gguf", int(qtype), kernel_layout=quant.kernel_layout,
                    gguf_impl=gguf_impl, int8_activations=quant.int8_activations,
                )  # fmt: skip
        else:
            scale = out.pop(name + SCALE_SUFFIX)
            method = projection_method(quant, name)
            out[name] = QuantizedWeight(p[name], scale, method, kernel_layout=quant.kernel_layout)
    return out


def projection_method(quant: WeightQuant, name: str) -> str:
    """How projection `name` multiplies: w8a8 keeps W8A8_WEIGHT_ONLY ones weight-only; fp8
    with fp8 activations is "fp8_dynamic" for every projection (SmolLM2's perplexity on
    tests/quantization/data/english.txt: +2.1% of bfloat16's, +1.1% weight-only)."""
    if quant.method == "w8a8" and name in W8A8_WEIGHT_ONLY:
        return "int8"
    if quant.method == "fp8" and quant.fp8_activations:
        return "fp8_dynamic"
    return quant.method


def fuse_quantized(
    fused: dict[str, tuple[str, ...]], quant: WeightQuant | None
) -> tuple[dict[str, tuple[str, ...]], WeightQuant | None]:
    """The per-layer layout's fusions (name -> parts, concatenated on the output axis) with
    each quantized part's scale fused alongside, and the quantization spec naming the fused
    weights. GGUF parts of different block types cannot share one packed array: they stay
    separate."""
    if quant is None:
        return fused, quant
    plan, types = {}, list(quant.gguf_types)
    for name, parts in fused.items():
        if quant.method == "gguf":
            kinds = {quant.gguf_type(part) for part in parts}
            if len(kinds) != 1:
                continue
            kind = kinds.pop()
            if kind is not None:
                types.append((name, kind))
        elif parts[0] in PROJECTIONS:
            plan[name + SCALE_SUFFIX] = tuple(part + SCALE_SUFFIX for part in parts)
        plan[name] = parts
    return plan, dataclasses.replace(quant, gguf_types=tuple(types))
