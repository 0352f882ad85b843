"""Quantized modes under tensor parallel 2 and 4 on fake CPU devices give the one-device
greedy tokens; LoRA adapters on an int8 base serve through the engine (tp_check.py)."""

from pathlib import Path

import pytest

from tests.device_check_script import run_check_script
from tests.quantization.tp_check import MODES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results():
    return run_check_script("tests/quantization/tp_check.py")


@pytest.mark.slow
@pytest.mark.parametrize(("quantization", "kv"), MODES)
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_one_device(results, quantization, kv, tp):
    assert results[f"{quantization}/{kv}/tp{tp}"] == results[f"{quantization}/{kv}/tp1"]


@pytest.mark.slow
def test_lora_on_an_int8_base_through_the_engine(results):
    assert results["engine-lora/tp2"] == results["engine-lora/tp1"]
    assert results["engine-base/tp2"] == results["engine-base/tp1"]
    # The engine's base rows are the model-level int8 weights + int8 KV cache tokens ...
    assert results["engine-base/tp1"] == results["int8/int8/tp1"]
    # ... and the adapter changes them (it is applied on top of the quantized base).
    assert results["engine-lora/tp1"] != results["engine-base/tp1"]
