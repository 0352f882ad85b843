"""Lays a decoder's weights out for the CPU kernels, once, at load (per-layer layout only)."""

import dataclasses

from flax import nnx

from xlaserve.kernels_cpu import gguf as gguf_kernel
from xlaserve.kernels_cpu import skinny
from xlaserve.quantization.linear import FUSED, PROJECTIONS


def pack_for_cpu_kernel(model) -> None:
    """Lays a per-layer `Transformer`'s projections out for the CPU kernels where they run:
    unquantized bfloat16 ones (and a copy of the LM head) in the skinny matmul's panels,
    GGUF-packed ones as the GGUF file's own rows. XLA's CPU matmuls reach 20-40% of memory
    bandwidth at decode batch sizes; the kernels stream the weights close to it."""
    if not skinny.available():
        return
    quant = model.quant
    if quant is not None and quant.method != "gguf":
        return  # every projection is quantized and runs its own matmul
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
                    param.set_value(param[...].T)  # [row_bytes, out] -> [out, row_bytes]
        model.quant = dataclasses.replace(quant, gguf_rows=True)
    if model.lm_head_rows is not None:
        return  # the GGUF head's packed rows already feed the kernel
    tied = model.config.tie_word_embeddings
    head = model.embed[...].T if tied else model.lm_head[...]  # [D, V]
    if skinny.packable(head):
        model.lm_head_panels = nnx.Param(skinny.pack(head), logical_axes=(None,) * 3)
        if not tied:
            del model.lm_head  # the packed copy is the only one read
