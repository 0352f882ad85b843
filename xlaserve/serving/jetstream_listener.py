"""A separate gRPC listener for unchanged JetStream clients (`xlaserve serve --jetstream-port`).

JetStream's requester, benchmark and proto clients send no metadata, so with `--api-key` the
main gRPC port answers them UNAUTHENTICATED. This listener, on the same host, serves only
`jetstream_proto.Orchestrator` and `grpc.health.v1.Health`. Its key is `--jetstream-api-key`,
else `--api-key`; it is open only when the operator passes `--jetstream-no-auth`, and then a
warning is logged at start-up (bind it to a private address or firewall it).
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2_grpc

from xlaserve.serving.context import ServerConfig, ServingContext, bearer_matches
from xlaserve.serving.grpc_decode import DecodeErrorInterceptor
from xlaserve.serving.grpc_server import AuthInterceptor, HealthServicer
from xlaserve.serving.jetstream import JETSTREAM_SERVICE, OrchestratorServicer
from xlaserve.serving.proto import jetstream_pb2_grpc

logger = logging.getLogger(__name__)


def jetstream_key(config: ServerConfig) -> str | None:
    """The API key the JetStream listener requires (None: none)."""
    if config.jetstream_no_auth:
        return None
    return config.jetstream_api_key or config.api_key


async def start_jetstream_server(
    ctx: ServingContext, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """Builds and starts the JetStream-only server; returns it and the bound port."""
    key = jetstream_key(ctx.config)
    server = grpc.aio.server(
        interceptors=[
            AuthInterceptor(ctx, authorized=lambda value: bearer_matches(value, key)),
            DecodeErrorInterceptor(),
        ],
        options=[
            ("grpc.max_receive_message_length", ctx.config.max_body_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    jetstream_pb2_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(ctx), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(ctx, [JETSTREAM_SERVICE]), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    where = f"cannot bind the JetStream server to {address} (--jetstream-port)"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises this when the address is taken
        raise OSError(f"{where}: {e}") from e
    if bound == 0:
        raise OSError(f"{where}: address in use?")
    await server.start()
    if key is None and ctx.config.jetstream_no_auth:
        logger.warning(
            "JetStream server on %s:%d accepts requests WITHOUT an API key "
            "(--jetstream-no-auth): anyone who reaches this port can use the model",
            host,
            bound,
        )
    else:
        auth = "API key required" if key is not None else "no API key (none configured)"
        logger.info("JetStream server on %s:%d (%s)", host, bound, auth)
    return server, bound
