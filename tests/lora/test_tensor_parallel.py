"""LoRA under tensor parallel 2 and 4 (and data parallel 2 x tensor parallel 2) on fake CPU
devices equals one device and peft: adapters are split like the base weights they attach to."""

from pathlib import Path

import numpy as np
import pytest

from tests.device_check_script import run_check_script
from tests.lora.tp_check import LAYOUTS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results():
    return run_check_script("tests/lora/tp_check.py")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [f"tp{t}/dp{d}" for t, d in LAYOUTS[1:]])
def test_parallel_lora_equals_one_device_and_peft(results, layout):
    one, got = results["tp1/dp1"], results[layout]
    assert one["tokens"][:2] == results["peft"]  # the two adapter requests, as peft
    assert got["tokens"] == one["tokens"]
    for a, b in zip(got["logprobs"], one["logprobs"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)  # float32; only sum order differs
    assert got["compiles_after_warmup"] == 0


@pytest.mark.slow
def test_adapter_slots_are_split_like_their_base_weights(results):
    specs = results["tp4/dp1"]["specs"]
    assert specs["wq.b"] == "(None, None, None, 'model')"  # column-parallel: B on its outputs
    assert specs["wq.a"] == "(None, None, None, None)"
    assert specs["wo.a"] == "(None, 'model', None, None)"  # row-parallel: A on its inputs
    assert specs["wo.b"] == "(None, None, None, None)"
    # w_up's B [L, S, R, F] (S = max_loras 2 stored slots): F = 128 split four ways.
    assert results["tp4/dp1"]["w_up_b_shard"] == [2, 2, 8, 32]
    assert results["tp2/dp1"]["w_up_b_shard"] == [2, 2, 8, 64]
