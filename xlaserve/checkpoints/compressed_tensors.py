"""Pre-quantized compressed-tensors checkpoints (the format llm-compressor writes and vLLM
serves): which ones xlaserve serves, and their stored 8-bit weights.

Served: the decoder's Linear layers (all seven projections of every layer) quantized alike,
symmetric, with one scale per output channel or one per tensor, stored as int8
(`int-quantized`, `naive-quantized`, or 8-bit `pack-quantized`) or float8_e4m3fn
(`float-quantized`). They run as xlaserve's own modes, on the stored values and scales as they
are (nothing is quantized again):

- int8 weights with dynamic per-token int8 activations (W8A8) -> "w8a8";
- int8 weights without activation quantization (W8A16) -> "int8";
- float8 weights (FP8, FP8_DYNAMIC) -> "fp8": float8 activations with dynamic per-token
  scales where the device multiplies fp8 (quantization/model.fp8_matmul_supported), the model
  dtype elsewhere (logged at load); static per-tensor int8 activations become "w8a8"'s dynamic
  per-token ones (finer).

The embedding table and the LM head stay as stored (compressed-tensors leaves them unquantized).
Refused, naming the field: other quantization methods (GPTQ, AWQ, ...), group or block
scales, 4-bit weights, zero points (asymmetric), sparsity, transforms, a KV-cache scheme,
quantized output activations, and projections left unquantized in some layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ml_dtypes
import numpy as np

logger = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
FORMATS = {
    "int-quantized": "int",
    "naive-quantized": "int",
    "pack-quantized": "int",
    "float-quantized": "float",
}
SCALE_SUFFIX = ".weight_scale"


@dataclass(frozen=True)
class Prequantized:
    """How a compressed-tensors checkpoint runs: `method` is the xlaserve mode ("int8",
    "w8a8" or "fp8") its stored weights feed."""

    method: str
    format: str


def quantization_config(hf_config: dict) -> dict | None:
    return hf_config.get("quantization_config") or hf_config.get("compression_config")


def read_scheme(hf_config: dict, source: str) -> Prequantized | None:
    """The served scheme of a pre-quantized checkpoint (None for an unquantized one).

    Raises ValueError naming the method or field xlaserve does not serve."""
    config = quantization_config(hf_config)
    if not config:
        return None
    method = config.get("quant_method", config.get("format", "unknown"))
    if method != QUANT_METHOD:
        raise ValueError(
            f"{source} is a pre-quantized checkpoint (quant_method {method!r}); xlaserve reads "
            f"{QUANT_METHOD!r} checkpoints (int8 / float8, per channel or per tensor); load the "
            "unquantized model with quantization='int8', 'w8a8' or 'fp8' instead"
        )

    def refuse(what: str) -> ValueError:
        return ValueError(
            f"{source}: compressed-tensors {what} is not served (xlaserve serves symmetric "
            "8-bit weights with one scale per output channel or tensor)"
        )

    for field in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if config.get(field):
            raise refuse(f"{field} {config[field]!r}")
    groups = config.get("config_groups") or {}
    if not groups:
        raise refuse("quantization_config without config_groups")
    schemes = set()
    for name, group in groups.items():
        fmt = group.get("format") or config.get("format")
        if fmt not in FORMATS:
            raise refuse(f"format {fmt!r} (group {name!r})")
        weights = group.get("weights") or {}
        kind = weights.get("type")
        checks = {
            "weights.num_bits": (weights.get("num_bits"), 8),
            "weights.type": (kind, FORMATS[fmt]),
            "weights.symmetric": (weights.get("symmetric"), True),
            "weights.dynamic": (weights.get("dynamic", False), False),
        }
        for field, (got, want) in checks.items():
            if got != want:
                raise refuse(f"{field} {got!r} (group {name!r})")
        if weights.get("strategy") not in ("channel", "tensor"):
            raise refuse(f"weights.strategy {weights.get('strategy')!r} (group {name!r})")
        if group.get("output_activations"):
            raise refuse(f"output_activations (group {name!r})")
        schemes.add((fmt, kind, _activations(group.get("input_activations"), kind, source)))
    if len(schemes) != 1:
        raise refuse(f"mixed config_groups {sorted(schemes)}")
    fmt, kind, method = schemes.pop()
    return Prequantized(method=method, format=fmt)


def _activations(args: dict | None, kind: str, source: str) -> str:
    if kind == "float":
        if args and not args.get("dynamic", False):
            logger.warning("%s: static float8 activation scales are not used: activations get "
                           "dynamic per-token scales where the device has fp8 matmuls",
                           source)  # fmt: skip
        return "fp8"
    if not args:
        return "int8"
    if args.get("type") != "int" or args.get("num_bits") != 8:
        raise ValueError(f"{source}: compressed-tensors input_activations {args!r} are not "
                         "served (int8 weights take int8 or unquantized activations)")  # fmt: skip
    if not (args.get("dynamic") and args.get("strategy") == "token"):
        logger.warning("%s: static int8 activation scales are replaced by dynamic per-token "
                       "scales (w8a8)", source)  # fmt: skip
    return "w8a8"


def take_quantized(
    tensors: dict[str, np.ndarray], scheme: Prequantized, source: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Takes each quantized Linear's stored tensors out of `tensors` (HF names) and puts back
    its dequantized `weight` (float32, for building the model), returning
    {hf weight name: (values [out, in] int8 / float8_e4m3fn, scale f32[out])}."""
    stored = {}
    for scale_name in [n for n in tensors if n.endswith(SCALE_SUFFIX)]:
        prefix = scale_name[: -len(SCALE_SUFFIX)]
        if prefix + ".weight_zero_point" in tensors:
            raise ValueError(f"{source}: {prefix} has zero points (asymmetric weights), which "
                             "are not served")  # fmt: skip
        values = _values(tensors, prefix, scheme, source)
        scale = np.asarray(tensors.pop(scale_name), np.float32).reshape(-1)
        if scale.size == 1:  # one scale per tensor: the same for every output channel
            scale = np.full(values.shape[0], scale[0], np.float32)
        if scale.shape != (values.shape[0],) or not np.isfinite(scale).all() or (scale < 0).any():
            raise ValueError(f"{source}: {scale_name} holds {scale.size} scales for "
                             f"{values.shape[0]} output channels, or non-finite / negative "
                             "ones; the checkpoint is corrupt")  # fmt: skip
        tensors.pop(prefix + ".input_scale", None)  # static activation scales (see module doc)
        tensors[prefix + ".weight"] = values.astype(np.float32) * scale[:, None]
        stored[prefix + ".weight"] = (values, scale)
    return stored


def _values(tensors: dict, prefix: str, scheme: Prequantized, source: str) -> np.ndarray:
    if prefix + ".weight_packed" in tensors:  # 8-bit pack-quantized: bytes of q + 128
        packed = np.ascontiguousarray(tensors.pop(prefix + ".weight_packed"))
        out, inner = (int(n) for n in tensors.pop(prefix + ".weight_shape"))
        if packed.dtype != np.int32 or packed.shape != (out, -(-inner // 4)):
            raise ValueError(
                f"{source}: {prefix}.weight_packed {packed.dtype}{packed.shape} does not hold "
                f"8-bit values of a [{out}, {inner}] weight"
            )
        unsigned = packed.astype("<i4").view(np.uint8).reshape(out, -1)[:, :inner]
        return (unsigned.astype(np.int16) - 128).astype(np.int8)
    values = tensors.pop(prefix + ".weight", None)
    want = np.int8 if FORMATS[scheme.format] == "int" else ml_dtypes.float8_e4m3fn
    if values is None or values.dtype != want or values.ndim != 2:
        got = "missing" if values is None else f"{values.dtype}{values.shape}"
        raise ValueError(f"{source}: {prefix}.weight is {got}; a {scheme.format} checkpoint "
                         f"stores a 2-D {np.dtype(want).name} weight there")  # fmt: skip
    return values
