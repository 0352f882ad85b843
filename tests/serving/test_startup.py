"""Start-up feedback: ports are taken before the model loads (a port in use fails at once,
naming it, exit 2); while the engine loads and warms up, readiness says "starting" (HTTP 503,
gRPC NOT_SERVING), liveness says 200, and requests are refused with 503 / UNAVAILABLE instead
of hanging; warm-up reports graph i of n on stderr."""

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.models.tiny_configs import save_tiny_model
from tests.serving.helpers import AUTH, controlled_mock_engine
from xlaserve.engine.async_engine import AsyncEngine
from xlaserve.serving.proto import jetstream_pb2 as js
from xlaserve.serving.proto import jetstream_pb2_grpc as js_grpc
from xlaserve.serving.proto import xlaserve_pb2 as pb
from xlaserve.serving.proto import xlaserve_pb2_grpc as pb_grpc
from xlaserve.serving.server import ServerConfig, ServerThread

CONFIG = dict(grpc_port=0, http_port=0, api_key="test-key", max_body_bytes=64 << 10)
HEADERS = {"Authorization": "Bearer test-key"}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    save_tiny_model("qwen2", folder)
    return str(folder)


def serve_argv(model: str, *extra: str) -> list[str]:
    engine = ["--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "4"]
    return [sys.executable, "-m", "xlaserve.cli", "serve", "--model", model, *engine, *extra]


def taken_port() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port"])
def test_port_in_use_fails_at_once_naming_the_port(tiny_model, flag):
    other = "--grpc-port" if flag == "--http-port" else "--http-port"
    with taken_port() as sock:
        port = sock.getsockname()[1]
        argv = serve_argv(tiny_model, flag, str(port), other, "0")
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        start = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"127.0.0.1:{port}" in proc.stderr and flag in proc.stderr
    assert "loaded" not in proc.stderr  # failed before the model was loaded
    assert elapsed < 5.0, f"took {elapsed:.1f}s to report the port in use"


def gated_builder():
    """A builder that blocks until `gate` is set: the engine "loads" as long as the test wants."""
    gate = threading.Event()
    calls = []

    def build() -> AsyncEngine:
        calls.append(1)
        if not gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return AsyncEngine(controlled_mock_engine())

    return build, gate, calls


def test_starting_then_ready_over_http_and_grpc():
    build, gate, calls = gated_builder()
    server = ServerThread(build, ServerConfig(**CONFIG))
    endpoints = server.start(wait_ready=False)
    http = httpx.Client(base_url=endpoints.http_url, timeout=10)
    channel = grpc.insecure_channel(endpoints.grpc_target)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == NOT_SERVING
        assert calls == [1]  # the build runs while the servers answer

        # Readiness "starting", liveness 200 (no API key needed for either).
        r = http.get("/health")
        assert r.status_code == 503
        assert r.json()["status"] == "starting" and "starting" in r.json()["reason"]
        for path in ("/health/live", "/livez"):
            assert http.get(path).status_code == 200
        assert health.Check(health_pb2.HealthCheckRequest()).status == NOT_SERVING
        jetstream = js_grpc.OrchestratorStub(channel)
        assert not jetstream.HealthCheck(js.HealthCheckRequest()).is_live
        assert http.get("/metrics", headers=HEADERS).status_code == 200

        # Requests are refused at once with "starting", never left hanging.
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=HEADERS)
        assert r.status_code == 503 and "starting" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", headers=HEADERS,
                      json={"messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
        assert r.status_code == 503 and "starting" in r.json()["error"]["message"]
        assert http.get("/v1/models", headers=HEADERS).status_code == 503
        stub = pb_grpc.XlaServeStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(text="Hi"), metadata=AUTH, timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "starting" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as info:
            list(jetstream.Decode(js.DecodeRequest(text_content=js.DecodeRequest.TextContent(
                text="Hi"), max_tokens=2), metadata=AUTH, timeout=10))  # fmt: skip
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        gate.set()  # the engine is ready
        assert next(watch).status == SERVING
        server.wait_ready(timeout=30)
        assert http.get("/health").json() == {"status": "SERVING"}
        assert http.get("/livez").status_code == 200
        assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING
        r = http.post("/v1/completions", headers=HEADERS,
                      json={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True})  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        watch.cancel()
    finally:
        gate.set()
        channel.close()
        http.close()
        assert server.stop() == 0


def test_shutdown_while_starting_exits_cleanly():
    build, gate, _ = gated_builder()
    server = ServerThread(build, ServerConfig(**CONFIG))
    endpoints = server.start(wait_ready=False)
    assert httpx.get(f"{endpoints.http_url}/health", timeout=10).status_code == 503
    assert server.stop(timeout=10) == 0  # does not wait for the load to finish
    gate.set()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{endpoints.http_url}/livez", timeout=2)


def test_a_failed_build_stops_the_servers_and_raises():
    def build():
        raise FileNotFoundError("no checkpoint at /nowhere")

    server = ServerThread(build, ServerConfig(**CONFIG))
    endpoints = server.start(wait_ready=False)
    with pytest.raises(RuntimeError) as info:
        server.wait_ready(timeout=10)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{endpoints.http_url}/livez", timeout=2)


@pytest.mark.slow
def test_serve_reports_loading_and_warmup_progress_on_stderr(tiny_model, tmp_path):
    argv = serve_argv(tiny_model, "--grpc-port", "0", "--http-port", "0")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        try:
            banner = lines.get(timeout=240)
        except queue.Empty:
            pytest.fail("no banner; stderr:\n" + (tmp_path / "stderr.txt").read_text()[-3000:])
        assert re.search(r"HTTP on http://[\d.]+:\d+ .*ready after [\d.]+s", banner), banner
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = (tmp_path / "stderr.txt").read_text()
    assert "xlaserve starting: gRPC on" in err  # printed once the ports are bound
    assert f"loading {tiny_model}" in err and f"loaded {tiny_model} in" in err
    progress = re.findall(r"warm-up: graph (\d+) of (\d+) compiled \((.+?)\) after [\d.]+s", err)
    assert progress, err[-3000:]
    n = int(progress[0][1])
    assert [int(i) for i, _, _ in progress] == list(range(1, n + 1))
    assert progress[0][2].startswith("forward T=")
    # the "starting" line comes before the model loads
    assert err.index("xlaserve starting") < err.index(f"loading {tiny_model}")
