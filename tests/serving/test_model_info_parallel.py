"""GetModelInfo over gRPC reports the devices and mesh an engine really spans under tensor and
data parallelism (8 fake CPU devices, in a subprocess: XLA_FLAGS must be set before jax loads).

Before the runner contract had `device_info()`, a tensor-parallel engine answered one device
and an empty mesh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def answers():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests/serving/model_info_tp_check.py")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


# What both layouts share: the tiny llama2 of tests/models/tiny_configs.py (vocab 160, eos 2)
# built with max_model_len 128, float32 and the default page size.
COMMON = {"max_model_len": 128, "vocab_size": 160, "dtype": "float32", "platform": "cpu",
          "eos_token_ids": [2], "page_size": 16}  # fmt: skip


@pytest.mark.slow
def test_tensor_parallel_4_reports_four_devices_on_the_model_axis(answers):
    info = answers["tp4"]["info"]
    assert info["num_devices"] == 4
    assert info["mesh_shape"] == {"data": 1, "expert": 1, "model": 4}
    assert {k: info[k] for k in COMMON} == COMMON
    assert info["model_name"] == answers["folder"]
    # One replica: max_num_seqs as given; the CPU KV budget is max_num_seqs sequences of
    # max_model_len: 4 * 128 / 16 = 32 pages.
    assert (info["max_num_seqs"], info["num_kv_pages"]) == (4, 32)


@pytest.mark.slow
def test_data_parallel_2_by_tensor_parallel_2_reports_both_axes(answers):
    info = answers["dp2xtp2"]["info"]
    assert info["num_devices"] == 4
    assert info["mesh_shape"] == {"data": 2, "expert": 1, "model": 2}
    assert {k: info[k] for k in COMMON} == COMMON
    # Totals over both replicas: sequences in flight and KV pages.
    assert (info["max_num_seqs"], info["num_kv_pages"]) == (2 * 4, 2 * 32)


@pytest.mark.slow
def test_both_servers_serve_the_same_greedy_tokens_and_exit_cleanly(answers):
    tp4, dp = answers["tp4"], answers["dp2xtp2"]
    assert len(tp4["tokens"]) == 6 and all(0 <= t < 160 for t in tp4["tokens"])
    assert dp["tokens"] == tp4["tokens"]
    assert (tp4["exit_code"], dp["exit_code"]) == (0, 0)
