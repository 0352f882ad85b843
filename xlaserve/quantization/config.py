"""The quantization option names and their device-free validation (EngineArgs calls these)."""

# int8: int8 weights with per-output-channel scales, activations in the model dtype (w8a16).
# w8a8: the same weights, activations quantized per token at run time; int8 x int8 -> int32.
# fp8: float8_e4m3fn weights with per-output-channel scales (w8a16 on fp8 storage).
# gguf: a GGUF file's quantized blocks kept packed on the device, dequantized in the matmul.
# gguf_a8: the same blocks, activations quantized to int8 per run of 32 values at run time
# (llama.cpp's and vLLM's GGUF arithmetic: integer dots, faster where the CPU dequantizes).
QUANTIZATION_METHODS = ("int8", "w8a8", "fp8", "gguf", "gguf_a8")
# The methods that keep a GGUF file's blocks packed.
GGUF_METHODS = ("gguf", "gguf_a8")
# auto: the model dtype (float32 on the CPU engine). int8 / fp8: 8-bit values with one scale
# per token and KV head (see kv_cache.py).
KV_CACHE_DTYPES = ("auto", "int8", "fp8")


def check_quantization(value) -> None:
    """Raises ValueError naming the bad value when `value` is not None or a known method."""
    if value is not None and value not in QUANTIZATION_METHODS:
        raise ValueError(
            f"quantization must be one of {QUANTIZATION_METHODS} or None, got {value!r}"
        )


def check_kv_cache_dtype(value) -> None:
    if value not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {value!r}")
