"""Options that cannot be honoured are refused at start-up with the bad value named."""

import json

import numpy as np
import pytest

from tests.checkpoints.test_gguf import tiny_tensors, write_gguf
from xlaserve import LLM, EngineArgs
from xlaserve.checkpoints.loader import load_model


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("quantization", "int4", "quantization must be one of .* got 'int4'"),
        ("kv_cache_dtype", "float16", "kv_cache_dtype must be one of .* got 'float16'"),
    ],
)
def test_unknown_names_are_refused(option, value, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**{option: value})


@pytest.mark.parametrize(
    "kwargs", [dict(quantization="int8"), dict(kv_cache_dtype="fp8")], ids=lambda k: str(k)
)
def test_torch_backend_refuses_quantization(kwargs):
    with pytest.raises(ValueError, match="backend 'torch' runs 16/32-bit weights"):
        LLM(backend="torch", **kwargs)


@pytest.mark.parametrize("method", ["gguf", "gguf_a8"])
def test_gguf_packing_needs_a_gguf_file(method):
    with pytest.raises(ValueError, match=f"quantization '{method}' keeps a GGUF file's blocks"):
        LLM("llama-3.2-1b", load_format="dummy", quantization=method)


def test_corrupt_block_scales_are_refused(tmp_path):
    tensors = tiny_tensors(np.random.default_rng(0))
    tensors["blk.1.ffn_up.weight"][3, 5] = np.nan  # a NaN weight: its scale cannot be right
    path = write_gguf(tmp_path / "m.gguf", tensors)
    with pytest.raises(ValueError, match="projection 'w_up' holds NaN or infinite values"):
        load_model(str(path), with_tokenizer=False, quantization="int8")


def test_prequantized_checkpoints_of_other_methods_are_refused_by_their_method(tmp_path):
    # compressed-tensors checkpoints load (tests/checkpoints/test_compressed_tensors.py).
    quantization = {"quant_method": "awq", "bits": 4}
    config = {"architectures": ["LlamaForCausalLM"], "quantization_config": quantization}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pre-quantized checkpoint .*'awq'.*'compressed-tensors'"):
        load_model(str(tmp_path), with_tokenizer=False)


def test_pooling_runner_refuses_quantization():
    with pytest.raises(ValueError, match="runner 'pooling' serves 16/32-bit weights"):
        LLM(runner="pooling", quantization="int8")
