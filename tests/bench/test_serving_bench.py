"""The serving benchmark end to end: in-process on a tiny random model over both protocols, and
against a running (mock-engine) server whose engine counters it scrapes from /metrics."""

import json

import numpy as np
import pytest

from tests.models.tiny_configs import save_tiny_model
from tests.serving.helpers import API_KEY, start_mock_server
from xlaserve.bench import serve as bench

NUM, INPUT_LEN, OUTPUT_LEN = 4, 8, 5
WORKLOAD = ["--num-prompts", str(NUM), "--input-len", str(INPUT_LEN),
            "--output-len", str(OUTPUT_LEN), "--request-rate", "20", "--concurrency", "2",
            "--warmup-requests", "1"]  # fmt: skip


def check_run(run: dict, protocol: str) -> None:
    assert run["protocol"] == protocol
    assert run["completed"] == NUM and run["failed"] == 0, run["errors"]
    assert [r["output_tokens"] for r in run["requests"]] == [OUTPUT_LEN] * NUM
    assert run["output_tokens_exact"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = run[key]
        assert 0 <= d["p50"] <= d["p90"] <= d["p99"], (key, d)
    for r in run["requests"]:
        assert 0 < r["ttft"] <= r["e2e"]
        assert r["tpot"] == pytest.approx((r["e2e"] - r["ttft"]) / (OUTPUT_LEN - 1))
    assert run["ttft_ms"]["p50"] <= run["e2e_ms"]["p50"]
    assert run["output_token_throughput"] == pytest.approx(NUM * OUTPUT_LEN / run["duration_s"])
    e = run["engine"]
    assert e["available"] and e["steps"] >= OUTPUT_LEN  # every token needs its own step
    assert 0.0 <= e["host_overhead_share"] <= 1.0
    assert e["compiles_after_warmup"] == 0


def test_in_process_tiny_model_both_protocols(tmp_path):
    save_tiny_model("llama3", tmp_path / "m")  # no tokenizer: token-id prompts
    out = tmp_path / "out"
    code = bench.main(["--model", str(tmp_path / "m"), "--dtype", "float32",
                       "--max-model-len", "64", "--max-num-seqs", "4",
                       "--max-num-batched-tokens", "32", "--protocol", "grpc,http",
                       "--out", str(out), *WORKLOAD])  # fmt: skip
    assert code == 0
    (path,) = out.glob("*.json")
    assert (out / path.name.replace(".json", ".png")).stat().st_size > 0
    assert "| grpc | 20/s | 4/4 |" in (out / path.name.replace(".json", ".md")).read_text()
    result = json.loads(path.read_text())
    runs = result["runs"]
    assert [(r["protocol"], r["request_rate"], r["concurrency"]) for r in runs] == [
        ("grpc", 20.0, None), ("http", 20.0, None), ("grpc", "inf", 2), ("http", "inf", 2)
    ]  # fmt: skip
    for run in runs:
        check_run(run, run["protocol"])
        loop = run["engine"]["loop"]  # in-process: the loop's gaps and idle time are timed
        assert loop["steps"] >= run["engine"]["steps"]
        assert 0.0 <= loop["busy_gap_share"] <= 1.0 and 0.0 <= loop["idle_share"] <= 1.0
        # device time is part of step time, step time part of the run
        assert run["engine"]["device_seconds"] <= run["engine"]["step_seconds"]
        assert run["engine"]["step_seconds"] <= run["duration_s"]


def test_remote_server_counters_are_scraped(tmp_path):
    # The mock runner sleeps 3 ms per step and reports no device time: every step is host time.
    server, engine, runner = start_mock_server(delay=0.003, max_num_seqs=4)
    try:
        e = server.endpoints
        code = bench.main(["--grpc-target", e.grpc_target, "--http-url", e.http_url,
                           "--api-key", API_KEY, "--protocol", "grpc,http", "--device", "mock",
                           "--out", str(tmp_path), *WORKLOAD])  # fmt: skip
    finally:
        assert server.stop() == 0
    assert code == 0
    (path,) = tmp_path.glob("serving-mock-grpc-http-*-mock-*.json")
    result = json.loads(path.read_text())
    assert result["server"]["vocab_size"] == 97  # from the gRPC model info
    assert len(result["runs"]) == 4
    for run in result["runs"]:
        check_run(run, run["protocol"])
        eng = run["engine"]
        assert eng["device_seconds"] == 0.0 and eng["host_overhead_share"] == 1.0
        assert eng["mean_step_ms"] >= 3.0
        assert "loop" not in eng  # not measurable from outside the server
    assert sum(r["engine"]["steps"] for r in result["runs"]) <= runner.steps


def test_poisson_arrivals_follow_the_rate():
    import asyncio

    sent = []

    async def send(prompt):
        sent.append(asyncio.get_running_loop().time())
        return bench.RequestResult(ok=True)

    results, duration = asyncio.run(bench.drive(send, list(range(40)), rate=200.0,
                                                concurrency=None, seed=0))  # fmt: skip
    assert len(results) == 40 and all(r.ok for r in results)
    gaps = np.diff(sent)  # exponential with mean 1 / rate: 5 ms
    assert 1 / 400 < gaps.mean() < 1 / 100 and gaps.std() > 1 / 800
