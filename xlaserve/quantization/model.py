"""Rewrites a loaded decoder's weights into their quantized form, once, at load.

int8 / w8a8 / fp8 quantize the model's own projections (per output channel) and its
embedding table and LM head (per vocabulary row: int8 for int8 and w8a8, float8_e4m3fn for
fp8); gguf replaces the projections with the GGUF file's packed blocks and keeps the file's
LM head packed, a tied one serving the token lookup too. The norms stay in the model dtype
(see docs/quantization.md). With a mesh, the values and their scales land in the shards of
the weight they came from (scales follow the weight's output or vocabulary axis).
"""

import dataclasses
import logging
import re
from pathlib import Path

import gguf
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from xlaserve.models.transformer import DecoderLayers, Transformer, layer_param_specs
from xlaserve.quantization.config import GGUF_METHODS
from xlaserve.quantization.gguf_blocks import PACKED_TYPES, block_shape
from xlaserve.quantization.int8 import (
    quantize_per_channel,
    quantize_per_channel_fp8,
    quantize_per_row,
    quantize_per_row_fp8,
)
from xlaserve.quantization.linear import PROJECTIONS, SCALE_SUFFIX, WeightQuant
from xlaserve.sharding.mesh import MODEL
from xlaserve.sharding.rules import logical_rules, spec_for

logger = logging.getLogger(__name__)

# Our projection name -> the GGUF tensor of layer i.
GGUF_NAMES = {
    "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
    "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down",
}  # fmt: skip


def quantize_model(model: Transformer, method: str, *, mesh=None, source: str = "") -> None:
    """Quantizes `model`'s projections in place (stacked layout, before any per-layer split)."""
    layers = model.layers
    if not isinstance(layers, DecoderLayers):
        raise ValueError("quantize_model expects the stacked layer layout")
    for name in PROJECTIONS:  # a NaN/inf weight (or GGUF block scale) would corrupt the scales
        _check_finite(f"projection {name!r}", getattr(layers, name)[...], method, source)
    if method in GGUF_METHODS:
        packed = _gguf_packed(model, source, method)
        model.quant = WeightQuant(
            "gguf", tuple((n, t) for n, (_, t) in packed.items()),
            int8_activations=method == "gguf_a8",
        )  # fmt: skip
        for name, (raw, _) in packed.items():
            axes = _axes(layers, name)  # ("layers", in, out)
            _replace(layers, name, raw, ("layers", None, axes[2]), model, mesh)
        _keep_lm_head_packed(model, source, mesh)
        return
    fn = quantize_per_channel_fp8 if method == "fp8" else quantize_per_channel
    for name in PROJECTIONS:
        axes = _axes(layers, name)
        scale_axes = (axes[0], axes[2])
        weight = getattr(layers, name)[...]
        shardings = None
        if mesh is not None:
            shardings = (_sharding(model, mesh, axes), _sharding(model, mesh, scale_axes))
        values, scale = jax.jit(fn, out_shardings=shardings)(weight)
        _replace(layers, name, values, axes, model, None)
        _replace(layers, name + SCALE_SUFFIX, scale, scale_axes, model, None)
    _quantize_vocab_rows(model, method, mesh, source)
    model.quant = WeightQuant(method, fp8_activations=_fp8_activations(method, mesh))


def load_prequantized(
    model: Transformer, method: str, stored: dict, *, mesh=None, source: str = ""
) -> None:
    """Puts a pre-quantized checkpoint's stored projections (checkpoints/compressed_tensors:
    {HF weight name: (values [out, in], scale f32[out])}) in place of the dequantized ones the
    model was built with, as `method` ("int8", "w8a8", "fp8") lays them out; the embedding
    table and the LM head stay as the checkpoint stores them."""
    layers = model.layers
    if not isinstance(layers, DecoderLayers):
        raise ValueError("load_prequantized expects the stacked layer layout")
    specs = layer_param_specs(model.config)
    missing_projections = [name for name in PROJECTIONS if name not in specs]
    if missing_projections:
        raise ValueError(f"{source}: pre-quantized {model.config.architecture} checkpoints are "
                         f"not served (no dense {missing_projections} projections)")  # fmt: skip
    names = {
        name: [f"model.layers.{i}.{specs[name][0]}" for i in range(model.config.num_layers)]
        for name in PROJECTIONS
    }
    served = {hf for hf_names in names.values() for hf in hf_names}
    extra = sorted(set(stored) - served)
    if extra:
        raise ValueError(f"{source}: quantized {extra[0]} is not served (only the decoder "
                         "layers' projections run quantized)")  # fmt: skip
    for name, hf_names in names.items():
        unquantized = [hf for hf in hf_names if hf not in stored]
        if unquantized:
            raise ValueError(f"{source}: {unquantized[0]} is not quantized while other "
                             "projections are; every layer's projections must be quantized "
                             "alike")  # fmt: skip
        axes = _axes(layers, name)  # ("layers", in, out)
        values = np.stack([stored[hf][0].T for hf in hf_names])  # [L, in, out]
        scale = np.stack([stored[hf][1] for hf in hf_names])  # [L, out]
        _replace(layers, name, values, axes, model, mesh)
        _replace(layers, name + SCALE_SUFFIX, scale, (axes[0], axes[2]), model, mesh)
    model.quant = WeightQuant(method, fp8_activations=_fp8_activations(method, mesh))


def fp8_matmul_supported(device) -> bool:
    """Whether `device` multiplies float8 x float8 in hardware: NVIDIA GPUs of compute
    capability 8.9 and later (Ada, Hopper, Blackwell; XLA hands fp8 dots to cuBLASLt) and
    TPUs from the seventh generation (TPU7x, Ironwood). CPUs convert float8 element by
    element."""
    if device.platform == "gpu":
        major, minor = (int(v) for v in str(device.compute_capability).split(".")[:2])
        return (major, minor) >= (8, 9)
    if device.platform == "tpu":
        generation = re.search(r"TPU\s*v?(\d+)", device.device_kind)
        return generation is not None and int(generation.group(1)) >= 7
    return False


def _fp8_activations(method: str, mesh) -> bool:
    """fp8 weights get fp8 activations where every device of the run supports them."""
    if method != "fp8":
        return False
    devices = mesh.devices.flat if mesh is not None else jax.devices()[:1]
    supported = all(fp8_matmul_supported(d) for d in devices)
    logger.info("fp8: %s", "float8 activations per token (fp8 x fp8 matmuls)" if supported
                else "weight-only (this device has no fp8 matmul): activations stay in the "
                "model dtype")  # fmt: skip
    return supported


def _quantize_vocab_rows(model: Transformer, method: str, mesh, source: str) -> None:
    """The embedding table [V, D] (and an untied LM head, turned from [D, V] into rows [V, D])
    as 8-bit rows with one f32 scale per vocabulary row: the lookup dequantizes the rows it
    gathers, the head scales each logit by its row's scale (quantization/linear.py)."""
    fn = quantize_per_row_fp8 if method == "fp8" else quantize_per_row
    tables = [("embed", "embed_scale")]  # the table is [V, D] already
    if not model.config.tie_word_embeddings:
        tables.append(("lm_head", "lm_head_scale"))  # [D, V]
    axes, scale_axes = ("vocab", "embed"), ("vocab",)
    shardings = None
    if mesh is not None:
        shardings = (_sharding(model, mesh, axes), _sharding(model, mesh, scale_axes))
    for name, scale_name in tables:
        table = getattr(model, name)[...]
        _check_finite(name, table, method, source)
        rows = table if name == "embed" else table.T
        values, scale = jax.jit(fn, out_shardings=shardings)(rows)
        setattr(model, name, nnx.Param(values, logical_axes=axes))
        setattr(model, scale_name, nnx.Param(scale, logical_axes=scale_axes))


def _check_finite(what: str, weight: jax.Array, method: str, source: str) -> None:
    if not bool(jax.jit(lambda w: jax.numpy.isfinite(w).all())(weight)):
        raise ValueError(f"{source}: {what} holds NaN or infinite values; cannot quantize it "
                         f"({method})")  # fmt: skip


def _axes(layers: DecoderLayers, name: str) -> tuple:
    return getattr(layers, name).get_metadata()["logical_axes"]


def _sharding(model: Transformer, mesh, axes: tuple) -> NamedSharding:
    return NamedSharding(mesh, spec_for(axes, logical_rules(model.config, mesh.shape[MODEL])))


def _replace(layers: DecoderLayers, name: str, value, axes: tuple, model, mesh) -> None:
    if mesh is not None:
        value = jax.device_put(value, _sharding(model, mesh, axes))
    elif not isinstance(value, jax.Array):
        value = jax.numpy.asarray(value)
    setattr(layers, name, nnx.Param(value, logical_axes=axes))
    if name not in layers.names:
        layers.names = (*layers.names, name)


def _gguf_packed(model: Transformer, source: str, method: str) -> dict[str, tuple[np.ndarray, int]]:
    """name -> (packed rows uint8 [L, row_bytes, out], GGML type) for every projection whose
    blocks can stay packed; others keep the dequantized weights the loader gave them."""
    path = Path(source)
    if path.suffix != ".gguf" or not path.is_file():
        raise ValueError(f"quantization {method!r} keeps a GGUF file's blocks packed; model "
                         f"{source!r} is not a .gguf file (use int8, w8a8 or fp8)")  # fmt: skip
    reader = gguf.GGUFReader(path, "r")
    by_name = {t.name: t for t in reader.tensors}
    arch = reader.fields["general.architecture"].contents()
    c = model.config
    specs = layer_param_specs(c)
    packed = {}
    for name, gguf_name in GGUF_NAMES.items():
        tensors = [by_name[f"blk.{i}.{gguf_name}.weight"] for i in range(c.num_layers)]
        types = {int(t.tensor_type) for t in tensors}
        if len(types) != 1 or next(iter(types)) not in PACKED_TYPES:
            kinds = sorted(gguf.GGMLQuantizationType(t).name for t in types)
            logger.warning("gguf: %s is %s; kept dequantized in the model dtype", name, kinds)
            continue
        qtype = types.pop()
        in_dim, out_dim = specs[name][1]
        values, nbytes = block_shape(qtype)
        rows = []
        for t in tensors:
            raw = np.asarray(t.data)
            if raw.shape != (out_dim, in_dim // values * nbytes):
                raise ValueError(f"{path}: tensor {t.name!r} holds {raw.shape} packed bytes, "
                                 f"expected {(out_dim, in_dim // values * nbytes)}")  # fmt: skip
            if arch == "llama" and name in ("wq", "wk"):
                heads = c.num_heads if name == "wq" else c.num_kv_heads
                raw = _unpermute_rows(raw, heads)
            rows.append(raw.T)  # [row_bytes, out]
        packed[name] = (np.ascontiguousarray(np.stack(rows)), qtype)
    return packed


def _keep_lm_head_packed(model: Transformer, source: str, mesh) -> None:
    """Keeps the GGUF file's LM head (its output tensor, or the tied token embedding) in its
    packed rows when their type is one we read packed: a decode step then reads those bytes
    (Q8_0: 34 per 32 weights) for the logits instead of the model-dtype head. A tied model
    then drops its model-dtype table: the token lookup dequantizes the rows it gathers, the
    same values the loader's table held, so the model holds one packed copy."""
    reader = gguf.GGUFReader(Path(source), "r")
    by_name = {t.name: t for t in reader.tensors}
    tensor = by_name.get("output.weight") or by_name["token_embd.weight"]
    qtype = int(tensor.tensor_type)
    if qtype not in PACKED_TYPES:
        return
    rows = np.asarray(tensor.data)  # [V, row_bytes]
    if mesh is not None:
        value = jax.device_put(rows, _sharding(model, mesh, ("vocab", None)))
    else:
        value = jax.numpy.asarray(rows)
    model.lm_head_rows = nnx.Param(value, logical_axes=("vocab", None))
    model.quant = dataclasses.replace(model.quant, lm_head_type=qtype)
    if model.config.tie_word_embeddings:
        del model.embed  # the packed rows serve the lookup (Transformer.embedding_rows)
    else:
        del model.lm_head  # the packed rows are the only head read


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows [h, d/2, 2] for its rope; HF (and we) use [h, 2, d/2]."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
