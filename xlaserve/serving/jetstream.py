"""JetStream's `jetstream_proto.Orchestrator` over xlaserve's engine, so JetStream clients and
its benchmark scripts work unchanged.

Decode samples greedily (JetStream's servers sample as configured at start-up; the request
carries no sampling options), `max_tokens` 0 means "until eos or max_model_len", and a prompt
that does not leave room for `max_tokens` is cut at max_model_len rather than refused, as in
JetStream. Each response carries every sample (`num_samples` of them, in order) with the token
ids and text it added; a sample without news that step has empty fields.
"""

from __future__ import annotations

from xlaserve.engine.async_engine import EngineDeadError
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.serving.context import ServingContext
from xlaserve.serving.deltas import DeltaTracker
from xlaserve.serving.errors import Kind, ServingError, failed_in_flight
from xlaserve.serving.proto import jetstream_pb2 as js
from xlaserve.serving.proto import jetstream_pb2_grpc as js_grpc

JETSTREAM_SERVICE = js.DESCRIPTOR.services_by_name["Orchestrator"].full_name


def _decode_args(request: js.DecodeRequest):
    if request.session_cache:
        raise ServingError(
            Kind.INVALID,
            "session_cache is not supported: the prefix cache reuses shared prompt prefixes "
            "by itself; leave it empty",
        )
    which = request.WhichOneof("content")
    if which is None:
        raise ServingError(Kind.INVALID, "content is required: set text_content or token_content")
    if request.max_tokens < 0:
        raise ServingError(
            Kind.INVALID, f"max_tokens must be >= 0 (0: no limit), got {request.max_tokens}"
        )
    if request.num_samples < 0:
        raise ServingError(Kind.INVALID, f"num_samples must be >= 0, got {request.num_samples}")
    if which == "text_content":
        prompt = request.text_content.text
    else:
        prompt = {"prompt_token_ids": list(request.token_content.token_ids)}
    params = SamplingParams(
        n=max(request.num_samples, 1), temperature=0.0, max_tokens=request.max_tokens or None
    )
    return prompt, params


class OrchestratorServicer(js_grpc.OrchestratorServicer):
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def Decode(self, request: js.DecodeRequest, context):
        ctx = self.ctx
        try:
            prompt, params = _decode_args(request)
        except Exception as e:  # noqa: BLE001
            error = ctx.refuse(e)
            await context.abort(error.kind.grpc_code, error.message)
        try:
            stream = await ctx.submit(prompt, params, priority=request.priority, check_length=False)
        except ServingError as e:
            error = ctx.refuse(e)
            await context.abort(error.kind.grpc_code, error.message)
        tracker = DeltaTracker()
        try:
            async for output in stream:
                deltas = {d.index: d for d in tracker.update(output)}
                if not any(d.token_ids or d.text for d in deltas.values()):
                    continue
                content = js.DecodeResponse.StreamContent()
                for i in range(params.n):
                    d = deltas.get(i)
                    sample = content.samples.add()
                    if d is not None:
                        sample.text = d.text
                        sample.token_ids.extend(d.token_ids)
                yield js.DecodeResponse(stream_content=content)
        except EngineDeadError as e:
            error = failed_in_flight(e)
            await context.abort(error.kind.grpc_code, error.message)
        finally:
            if not stream.finished:
                ctx.engine.abort_nowait(stream.request_id)

    async def HealthCheck(self, request, context) -> js.HealthCheckResponse:
        return js.HealthCheckResponse(is_live=self.ctx.healthy)
