"""The gRPC server: xlaserve.v1.XlaServe, jetstream_proto.Orchestrator, grpc.health.v1.Health
and server reflection on one port, with API-key authentication on every method but health."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from xlaserve.engine.async_engine import EngineDeadError, RequestStream
from xlaserve.errors import InvalidRequestError
from xlaserve.pooling.grpc_embed import embed as pooling_embed
from xlaserve.serving.context import ServingContext
from xlaserve.serving.deltas import DeltaTracker
from xlaserve.serving.errors import Kind, ServingError, failed_in_flight
from xlaserve.serving.grpc_convert import generate_response, sampling_params_from_proto
from xlaserve.serving.grpc_decode import DecodeErrorInterceptor
from xlaserve.serving.jetstream import JETSTREAM_SERVICE, OrchestratorServicer
from xlaserve.serving.limits import limited
from xlaserve.serving.proto import jetstream_pb2_grpc
from xlaserve.serving.proto import xlaserve_pb2 as pb
from xlaserve.serving.proto import xlaserve_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

XLASERVE_SERVICE = pb.DESCRIPTOR.services_by_name["XlaServe"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Methods callable without an API key (load balancers and supervisors probe them).
UNAUTHENTICATED_METHODS = frozenset(
    {
        f"/{HEALTH_SERVICE}/Check",
        f"/{HEALTH_SERVICE}/Watch",
        f"/{JETSTREAM_SERVICE}/HealthCheck",
    }
)


async def abort_with(context: grpc.aio.ServicerContext, error: ServingError):
    await context.abort(error.kind.grpc_code, error.message)


async def stream_or_abort(ctx: ServingContext, context, submit) -> RequestStream:
    """Awaits `submit` (a ctx.submit call); a refusal ends the RPC with its status."""
    try:
        return await submit
    except ServingError as e:
        await abort_with(context, ctx.refuse(e))


class XlaServeServicer(pb_grpc.XlaServeServicer):
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def Generate(self, request: pb.GenerateRequest, context):
        ctx = self.ctx
        try:
            lora = ctx.check_model(request.model)
            if request.lora_name:
                lora = ctx.check_model(request.lora_name)
            which = request.WhichOneof("prompt")
            if which is None:
                raise ServingError(Kind.INVALID, "prompt is required: set text or token_ids")
            if which == "text" and request.images:
                prompt = {"prompt": request.text,
                          "multi_modal_data": {"image": list(request.images)}}  # fmt: skip
            elif which == "text":
                prompt = request.text
            elif request.images:
                raise ServingError(Kind.INVALID, "images need a text prompt holding their "
                                   "placeholders", param="images")  # fmt: skip
            else:
                prompt = {"prompt_token_ids": list(request.token_ids.ids)}
            params = sampling_params_from_proto(request.sampling_params)
            asked = params.max_tokens if request.sampling_params.HasField("max_tokens") else None
            config = ctx.config
            params = limited(
                params,
                max_n=config.max_n,
                asked=asked,
                default=config.max_tokens_default,
                cap=config.max_tokens_cap,
            )
        except Exception as e:  # noqa: BLE001 - reported to the client
            await abort_with(context, ctx.refuse(e))
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        stream = await stream_or_abort(
            ctx,
            context,
            ctx.submit(
                prompt,
                params,
                request_id=request.request_id or None,
                priority=request.priority,
                add_special_tokens=add_special,
                check_length=asked is not None,  # the server's default is cut, not refused
                lora_request=lora,
            ),
        )
        tracker, first = DeltaTracker(), True
        try:
            async for output in stream:
                deltas = tracker.update(output)
                if deltas or first or output.finished:
                    yield generate_response(output, deltas, first=first)
                    first = False
        except EngineDeadError as e:
            await abort_with(context, failed_in_flight(e))
        except InvalidRequestError as e:  # failed after it was accepted (its grammar)
            await abort_with(context, ctx.refuse(e))
        finally:
            if not stream.finished:  # cancelled, deadline passed, or the client went away
                ctx.engine.abort_nowait(stream.request_id)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        if not request.request_id:
            await abort_with(context, ServingError(Kind.INVALID, "request_id is required"))
        try:
            found = await self.ctx.engine.abort(request.request_id)
        except Exception as e:  # noqa: BLE001
            await abort_with(context, self.ctx.refuse(e))
        return pb.AbortResponse(found=found)

    async def LoadLoRAAdapter(self, request: pb.LoadLoRAAdapterRequest, context):
        try:
            info = await self.ctx.load_adapter(request.lora_name, request.lora_path)
        except Exception as e:  # noqa: BLE001 - reported to the client
            await abort_with(context, self.ctx.refuse(e))
        return pb.LoRAAdapter(
            lora_name=info.name,
            lora_int_id=info.lora_int_id,
            lora_path=info.path,
            rank=info.rank,
            identity=info.identity,
        )

    async def UnloadLoRAAdapter(self, request: pb.UnloadLoRAAdapterRequest, context):
        try:
            await self.ctx.unload_adapter(request.lora_name)
        except Exception as e:  # noqa: BLE001
            await abort_with(context, self.ctx.refuse(e))
        return pb.UnloadLoRAAdapterResponse()

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        try:
            return await pooling_embed(self.ctx, request)  # xlaserve/pooling/grpc_embed.py
        except Exception as e:  # noqa: BLE001 - reported to the client
            await abort_with(context, self.ctx.refuse(e))

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        try:
            info = self.ctx.model_info()
        except ServingError as e:  # still starting
            await abort_with(context, self.ctx.refuse(e))
        return pb.ModelInfo(**info)


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 answering from the engine's live state ("" = the whole server):
    NOT_SERVING while starting (loading, warm-up), draining or failed; SERVING otherwise."""

    def __init__(self, ctx: ServingContext, services: list[str]) -> None:
        self.ctx = ctx
        self.services = {"", *services}

    def _status(self, service: str):
        if service not in self.services:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        if self.ctx.healthy:
            return health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request, context):
        status = self._status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        last = None
        while True:
            status = self._status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await self.ctx.health_changed()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires metadata `authorization: Bearer <api key>` on every method but health.
    `authorized` checks the metadata value (default: the server's --api-key)."""

    def __init__(self, ctx: ServingContext, authorized=None) -> None:
        self.ctx = ctx
        self.authorized = authorized or ctx.authorized

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method in UNAUTHENTICATED_METHODS:
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self.authorized(metadata.get("authorization")):
            return handler
        message = (
            "missing API key: send metadata 'authorization: Bearer <key>'"
            if "authorization" not in metadata
            else "invalid API key"
        )
        self.ctx.metrics.refused("unauthenticated")

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator

        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        make = kinds[(handler.request_streaming, handler.response_streaming)]
        return make(
            deny_stream if handler.response_streaming else deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def start_grpc_server(
    ctx: ServingContext, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """Builds and starts the server; returns it and the bound port."""
    limit = ctx.config.max_body_bytes
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(ctx), DecodeErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_XlaServeServicer_to_server(XlaServeServicer(ctx), server)
    jetstream_pb2_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(ctx), server)
    health_pb2_grpc.add_HealthServicer_to_server(
        HealthServicer(ctx, [XLASERVE_SERVICE, JETSTREAM_SERVICE]), server
    )
    reflection.enable_server_reflection(
        (XLASERVE_SERVICE, JETSTREAM_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises this when the address is taken
        raise OSError(f"cannot bind the gRPC server to {address} (--grpc-port): {e}") from e
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {address} (--grpc-port): address in use?")
    await server.start()
    logger.info("gRPC server on %s:%d", host, bound)
    return server, bound
