"""Quantized weights, activations and KV cache (see docs/quantization.md).

`quantization=` on EngineArgs names how the decoder's projection matmuls run
(`QUANTIZATION_METHODS`); `kv_cache_dtype=` how the paged KV cache is stored
(`KV_CACHE_DTYPES`). The model code sees two hooks: `models/layers.linear` hands a
`QuantizedWeight` its own matmul (`linear.py`), and `Transformer` looks tokens up in, and
computes logits from, an embedding table / LM head quantized per vocabulary row (or a GGUF
file's packed rows). The weights are rewritten once at load (`model.py`).
"""

from xlaserve.quantization.config import (
    KV_CACHE_DTYPES,
    QUANTIZATION_METHODS,
    check_kv_cache_dtype,
    check_quantization,
)

__all__ = ["KV_CACHE_DTYPES", "QUANTIZATION_METHODS", "check_kv_cache_dtype", "check_quantization"]
