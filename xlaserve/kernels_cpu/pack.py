"""Lays a decoder's weights out for the CPU kernels, once, at load (per-layer layout only)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlaserve.kernels_cpu import attention as cpu_attention
from xlaserve.kernels_cpu import gguf as gguf_kernel
from xlaserve.kernels_cpu import int8 as int8_kernel
from xlaserve.kernels_cpu import skinny
from xlaserve.quantization.gguf_blocks import block_shape
from xlaserve.quantization.linear import FUSED, PROJECTIONS, projection_method


def pack_for_cpu_kernel(model) -> None:
    """Lays a per-layer `Transformer`'s projections out for the CPU kernels where they run:
    unquantized bfloat16 ones (and a copy of the LM head) in the skinny matmul's panels,
    GGUF-packed ones as the GGUF file's own rows, int8 ones in the int8 kernels' panels.
    XLA's CPU matmuls reach 20-40% of memory bandwidth at decode batch sizes; the kernels
    stream the weights close to it. "auto" attention becomes the CPU attention kernel, which
    reads each KV page once per sequence instead of per query row."""
    if model.attention_backend == "auto" and cpu_attention.supports(model.config.head_dim):
        model.attention_backend = cpu_attention.BACKEND
    if not skinny.available():
        return
    quant = model.quant
    if quant is not None and quant.method in int8_kernel.LANES:
        return _pack_int8(model)
    if quant is not None and quant.method != "gguf":
        return  # fp8 projections keep XLA's matmul
    first = model.layers[0]
    gguf_names = dict(quant.gguf_types) if quant else {}
    names = tuple(
        name for name in (*PROJECTIONS, *FUSED)
        if name in first.names and name not in gguf_names
        and skinny.packable(getattr(first, name)[...])
    )  # fmt: skip
    for layer in model.layers:
        for name in names:
            param = getattr(layer, name)
            param.set_value(skinny.pack(param[...]))
    model.packed = names
    if gguf_names and all(gguf_kernel.supports(t) for t in gguf_names.values()):
        for layer in model.layers:
            for name in gguf_names:
                if name in layer.names:
                    param = getattr(layer, name)
                    rows = param[...].T  # [row_bytes, out] -> [out, row_bytes]
                    qtype = gguf_names[name]
                    values, nbytes = block_shape(qtype)
                    in_features = rows.shape[1] // nbytes * values
                    if quant.int8_activations and gguf_kernel.planar(qtype, in_features):
                        rows = jnp.asarray(gguf_kernel.planar_rows(np.asarray(rows), qtype))
                    param.set_value(rows)
        model.quant = dataclasses.replace(quant, kernel_layout=True)
    if model.lm_head_rows is not None:
        return  # the GGUF head's packed rows already feed the kernel
    tied = model.config.tie_word_embeddings
    head = model.embed[...].T if tied else model.lm_head[...]  # [D, V]
    if skinny.packable(head):
        model.lm_head_panels = nnx.Param(skinny.pack(head), logical_axes=(None,) * 3)
        if not tied:
            del model.lm_head  # the packed copy is the only one read


def _pack_int8(model) -> None:
    """int8 / w8a8 projections into the int8 kernels' panels, all or none (one layout flag)."""
    quant = model.quant
    names = [name for name in (*PROJECTIONS, *FUSED) if name in model.layers[0].names]
    plan = {name: projection_method(quant, name) for name in names}
    if not all(
        int8_kernel.packable(getattr(layer, name)[...], method)
        for layer in model.layers
        for name, method in plan.items()
    ):
        return
    for layer in model.layers:
        for name, method in plan.items():
            param = getattr(layer, name)
            param.set_value(int8_kernel.pack(param[...], method))
    model.quant = dataclasses.replace(quant, kernel_layout=True)
