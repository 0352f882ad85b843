"""Undecodable gRPC requests end with INVALID_ARGUMENT, not UNKNOWN.

grpcio parses a request before the method runs; a parse failure (garbage bytes, invalid UTF-8 in
a string field) surfaces as UNKNOWN "Unexpected DecodeError" with a traceback in the server log.
`DecodeErrorInterceptor` wraps each unary-request handler's deserializer so that a failure
becomes a marker the method wrapper answers with INVALID_ARGUMENT naming the method.
Request-streaming methods (server reflection) are left as grpcio handles them.
"""

from __future__ import annotations

import inspect
import logging

import grpc

logger = logging.getLogger(__name__)


class _Undecodable:
    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _safe_deserializer(method: str, deserialize):
    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except Exception as e:  # noqa: BLE001 - DecodeError, or grpc's own wrapper of it
            return _Undecodable(
                f"the request to {method} is not a valid protobuf message ({len(raw)} bytes): {e}"
            )

    return parse


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = details.method
        if handler.response_streaming:
            behavior = handler.unary_stream
            if not inspect.isasyncgenfunction(behavior):
                return handler

            async def stream(request, context):
                if isinstance(request, _Undecodable):
                    await _refuse(context, request)
                async for response in behavior(request, context):
                    yield response

            make, wrapped = grpc.unary_stream_rpc_method_handler, stream
        else:
            behavior = handler.unary_unary
            if not inspect.iscoroutinefunction(behavior):
                return handler

            async def unary(request, context):
                if isinstance(request, _Undecodable):
                    await _refuse(context, request)
                return await behavior(request, context)

            make, wrapped = grpc.unary_unary_rpc_method_handler, unary
        return make(
            wrapped,
            request_deserializer=_safe_deserializer(method, handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


async def _refuse(context, request: _Undecodable) -> None:
    logger.info("refused an undecodable request: %s", request.message)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
