"""Process-level behaviour of `serve` (what `xlaserve serve` runs): an engine failure turns
health NOT_SERVING, fails in-flight requests on every protocol and makes `serve` return exit
status 1; a graceful shutdown finishes in-flight requests and returns 0."""

import json
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serving.helpers import API_KEY, AUTH, start_mock_server
from xlaserve.serving.client import XlaServeClient
from xlaserve.serving.proto import jetstream_pb2 as js
from xlaserve.serving.proto import jetstream_pb2_grpc as js_grpc
from xlaserve.serving.server import EXIT_ENGINE_FAILED, EXIT_OK

KEY = {"Authorization": f"Bearer {API_KEY}"}
LONG = dict(max_tokens=50, ignore_eos=True)


def test_engine_failure_flips_health_fails_requests_and_exits_nonzero():
    server, engine, runner = start_mock_server(delay=0.02, config={"failure_exit_delay_s": 3.0})
    ep = server.endpoints
    client = XlaServeClient(ep.grpc_target, api_key=API_KEY, timeout=30)
    channel = grpc.insecure_channel(ep.grpc_target)
    health = health_pb2_grpc.HealthStub(channel)
    orchestrator = js_grpc.OrchestratorStub(channel)
    errors: dict[str, str] = {}

    def grpc_stream():
        try:
            for _ in client.generate_stream([1], **LONG):
                pass
        except grpc.RpcError as e:
            errors["grpc"] = f"{e.code().name}: {e.details()}"

    def jetstream_stream():
        request = js.DecodeRequest(token_content={"token_ids": [2]}, max_tokens=50)
        try:
            for _ in orchestrator.Decode(request, metadata=AUTH, timeout=30):
                pass
        except grpc.RpcError as e:
            errors["jetstream"] = f"{e.code().name}: {e.details()}"

    def http_stream():
        body = {"prompt": [3], "stream": True, **LONG}
        with httpx.stream("POST", ep.http_url + "/v1/completions", json=body, headers=KEY,
                          timeout=30) as response:  # fmt: skip
            for line in response.iter_lines():
                if line.startswith("data: ") and "error" in json.loads(line[6:]):
                    errors["http"] = json.loads(line[6:])["error"]["message"]

    threads = [threading.Thread(target=f) for f in (grpc_stream, jetstream_stream, http_stream)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while engine.metrics()["num_running"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    runner.fail.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a stream hung after the engine failed"
    assert errors["grpc"].startswith("INTERNAL") and "injected fault" in errors["grpc"]
    assert errors["jetstream"].startswith("INTERNAL") and "injected fault" in errors["jetstream"]
    assert "injected fault" in errors["http"]
    # Health says so on every channel (the servers stay up for failure_exit_delay_s).
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not orchestrator.HealthCheck(js.HealthCheckRequest(), timeout=5).is_live
    response = httpx.get(ep.http_url + "/health")
    assert response.status_code == 503 and "injected fault" in response.json()["reason"]
    # New work is refused at once, not queued on a dead engine.
    with pytest.raises(grpc.RpcError) as info:
        client.generate([1], max_tokens=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    response = httpx.post(ep.http_url + "/v1/completions", json={"prompt": [1]}, headers=KEY)
    assert response.status_code == 503
    # ... and serve() returns the failure exit status by itself.
    assert server.wait(timeout=15) == EXIT_ENGINE_FAILED
    client.close()
    channel.close()


def test_graceful_shutdown_finishes_in_flight_requests_and_exits_zero():
    server, engine, runner = start_mock_server(delay=0.02)
    client = XlaServeClient(server.endpoints.grpc_target, api_key=API_KEY, timeout=30)
    stream = client.generate_stream([1], max_tokens=30, ignore_eos=True)
    first = next(stream)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    rest = list(stream)
    tokens = [t for r in [first, *rest] for s in r.samples for t in s.token_ids]
    assert len(tokens) == 30 and rest[-1].samples[0].finish_reason == "length"
    stopper.join(10)
    assert server.wait(timeout=10) == EXIT_OK
    client.close()
