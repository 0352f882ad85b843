"""Tensor and data parallelism give the same tokens as one device; shardings split memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import TEST_TOKEN_BUCKETS
from tests.device_check_script import run_check_script
from xlaserve.engine.runner_api import KVCacheSpec
from xlaserve.models.registry import preset_config
from xlaserve.sharding.mesh import make_mesh
from xlaserve.sharding.rules import (
    check_tensor_parallel,
    kv_cache_sharding,
    param_shardings,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parallel_results():
    return run_check_script("tests/sharding/tp_dp_check.py")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", ["tp2/dp1", "tp4/dp1", "tp8/dp1", "tp4/dp2"])
def test_same_tokens_and_logprobs_as_one_device(parallel_results, model, layout):
    one = parallel_results[f"{model}/tp1/dp1"]
    got = parallel_results[f"{model}/{layout}"]
    assert got["tokens"] == one["tokens"]
    for a, b in zip(got["logprobs"], one["logprobs"], strict=True):
        # float32; only the order of the cross-device sums differs.
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert got["compiles_after_warmup"] == 0 and got["pages_back"]
    if layout.endswith("dp2"):
        assert all(q > 0 for q in got["replica_queries"])  # both replicas served requests


def test_llama_3_8b_tensor_parallel_8_splits_parameters_and_kv_evenly():
    model_cls, config = preset_config("llama-3-8b")
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    mesh = jax.sharding.AbstractMesh((1, 8), ("data", "model"))  # shapes only, no devices
    shardings = param_shardings(abstract, mesh)
    params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    total = sum(int(np.prod(p.shape)) * 2 for p in params)
    per_device = sum(
        int(np.prod(s.shard_shape(p.shape))) * 2
        for p, s in zip(params, jax.tree.leaves(shardings), strict=True)
    )
    assert abs(per_device - total / 8) / (total / 8) < 0.05, (per_device, total / 8)
    spec = KVCacheSpec.for_model(config, page_size=16, dtype="bfloat16", kv_head_shards=8)
    cache_shape = spec.shape(num_pages=1024)
    cache_bytes = int(np.prod(cache_shape)) * 2
    shard = kv_cache_sharding(config, mesh).shard_shape(cache_shape)
    assert int(np.prod(shard)) * 2 == cache_bytes // 8 == 1024 * spec.page_bytes


def test_head_counts_that_do_not_split_are_refused_with_sizes_that_work():
    _, config = preset_config("smollm2-135m")  # 9 query heads, 3 KV heads
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 .* sizes that work: \[1, 3, 9\]"):
        check_tensor_parallel(config, 2)


def test_mesh_needs_enough_devices():
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(8, 2, devices=jax.devices()[:1] * 8)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_tensor_parallel_equal_one_device(tmp_path):
    from xlaserve import LLM, SamplingParams

    sys.path.insert(0, str(ROOT))
    from tests.sharding.multihost_worker import PROMPTS
    from tests.sharding.tp_dp_check import save

    save("llama", str(tmp_path))
    alone = LLM(str(tmp_path), dtype="float32", max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=64, compilation_cache_dir=None,
                token_buckets=TEST_TOKEN_BUCKETS)  # fmt: skip
    expected = [o.outputs[0].token_ids for o in alone.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)]  # fmt: skip
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = str(ROOT / "tests/sharding/multihost_worker.py")
    procs = [
        subprocess.Popen([sys.executable, worker, str(tmp_path), coordinator, str(i)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    result = json.loads(outs[0][0].strip().splitlines()[-1])
    assert result["tokens"] == expected
    assert result["compiles_after_warmup"] == 0
