"""Expert parallelism: the same greedy tokens as one device; each device holds 1/EP of the
expert weights, straight from the checkpoint; sizes that cannot work are refused. Gemma 3
under tensor parallel equals one device too."""

from pathlib import Path

import pytest

from tests.device_check_script import run_check_script
from xlaserve.models.registry import preset_config
from xlaserve.sharding.rules import check_expert_parallel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ep_results():
    return run_check_script("tests/sharding/ep_check.py")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("layout", ["ep2/tp1", "ep8/tp1", "ep2/tp2", "ep4/tp2"])
def test_same_greedy_tokens_as_one_device(ep_results, model, layout):
    one = ep_results[f"{model}/ep1/tp1"]
    got = ep_results[f"{model}/{layout}"]
    assert got["tokens"] == one["tokens"]
    assert got["compiles_after_warmup"] == 0


@pytest.mark.slow
def test_gemma3_tensor_parallel_same_greedy_tokens_as_one_device(ep_results):
    assert ep_results["gemma3/ep1/tp2"]["tokens"] == ep_results["gemma3/ep1/tp1"]["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("ep", ["2", "4", "8"])
def test_each_device_holds_its_share_of_the_experts(ep_results, model, ep):
    found = ep_results[f"{model}/bytes"][ep]
    assert len(found["per_device"]) == int(ep)
    assert found["per_device"] == [found["total"] // int(ep)] * int(ep)


def test_expert_parallel_sizes_that_cannot_work_are_refused():
    _, qwen3_moe = preset_config("qwen3-30b-a3b")  # 128 experts
    check_expert_parallel(qwen3_moe, 8)
    with pytest.raises(ValueError, match="does not divide the 128 experts"):
        check_expert_parallel(qwen3_moe, 3)
    _, llama = preset_config("llama-3-8b")
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        check_expert_parallel(llama, 2)
