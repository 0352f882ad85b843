"""Fixtures shared by the serving tests: a module that defines a `server` fixture (the
`Endpoints` of a running server) gets a gRPC `channel` and an authenticated `http` client to it."""

import grpc
import httpx
import pytest

from tests.serving.helpers import API_KEY

KEY = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, headers=KEY, timeout=30) as client:
        yield client
