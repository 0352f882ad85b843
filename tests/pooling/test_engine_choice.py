"""Which runner and dtype a pooling model gets, and what is refused at start-up."""

import pytest

from xlaserve import LLM
from xlaserve.pooling.backend import pooling_dtype
from xlaserve.pooling.runner_choice import resolve_runner


def test_runner_from_the_architecture(minilm_path):
    assert resolve_runner(str(minilm_path), "auto") == "pooling"  # BertModel
    assert resolve_runner(str(minilm_path), "pooling") == "pooling"
    assert resolve_runner("smollm2-135m-instruct", "auto") == "generate"  # a GGUF decoder
    assert resolve_runner("smollm2-135m-instruct", "pooling") == "pooling"
    with pytest.raises(ValueError, match="BertModel cannot generate"):
        resolve_runner(str(minilm_path), "generate")


def test_auto_dtype_on_the_cpu_is_the_checkpoints(minilm_path):
    assert pooling_dtype(str(minilm_path), "auto", True, "auto") == "float32"
    assert pooling_dtype(str(minilm_path), "bfloat16", True, "auto") == "bfloat16"
    assert pooling_dtype(str(minilm_path), "auto", False, "auto") == "auto"  # accelerators


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(backend="torch"), "backend 'torch' does not run pooling models"),
        (dict(tensor_parallel_size=2), "pooling models run on one device"),
        (dict(max_model_len=256, max_num_batched_tokens=128), "max_num_batched_tokens must be"),
    ],
)
def test_refused_at_start_up(minilm_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        LLM(str(minilm_path), **kwargs)
