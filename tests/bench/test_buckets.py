"""The bucket sweep: the traffic model worked by hand, and a real sweep on a tiny model."""

import json

import numpy as np

from tests.models.tiny_configs import save_tiny_model
from xlaserve.bench.buckets import TrafficProfile, bucket_of, main, tokens_per_step


def test_tokens_per_step_by_hand():
    # Two requests, prompts 5 and 3, outputs 2 and 1, budget 6, both admitted at once.
    # step 1: prompt A 5 tokens + 1 of prompt B = 6; step 2: A decodes (1) + B's last 2 = 3;
    # step 3: A decodes its 2nd token, B decodes its only token = 2.
    profile = TrafficProfile("t", np.array([5, 3]), np.array([2, 1]))
    assert tokens_per_step(profile, max_num_seqs=2, budget=6).tolist() == [6, 3, 2]


def test_bucket_of_rounds_up():
    assert bucket_of(np.array([1, 8, 9, 64]), (8, 16, 64)).tolist() == [8, 8, 16, 64]


def test_sweep_writes_results_and_recommends(tmp_path, capsys):
    save_tiny_model("llama3", tmp_path / "m")
    code = main(["--model", str(tmp_path / "m"), "--dtype", "float32", "--max-model-len", "128",
                 "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--repeats", "2",
                 "--profile", "fixed:20/10", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    result = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    tokens = [r for r in result["rows"] if r["kind"] == "tokens"]
    assert [r["bucket"] for r in tokens] == [8, 16, 32]
    assert all(r["step_s"] > 0 and r["compile_s"] > 0 for r in result["rows"])
    rec = result["recommendation"]
    assert rec["best"] in rec["sets"] and "recommended" in capsys.readouterr().out
    assert rec["sets"]["budget only"]["padding_waste"] > rec["sets"]["pow2 from 8"]["padding_waste"]
    assert {p.suffix for p in (tmp_path / "out").iterdir()} >= {".json", ".csv", ".md"}
