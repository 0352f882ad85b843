"""gRPC `XlaServe.Embed`: a pooling request per input through the server's one submit;
refusals are INVALID_ARGUMENT (or the status their kind maps to)."""

from __future__ import annotations

import uuid

from xlaserve.pooling.params import PoolingParams
from xlaserve.pooling.submit import pool_all
from xlaserve.serving.context import ServingContext
from xlaserve.serving.errors import Kind, ServingError, classify
from xlaserve.serving.proto import xlaserve_pb2 as pb


def _optional(request, name: str):
    return getattr(request, name) if request.HasField(name) else None


def embed_inputs(request: pb.EmbedRequest) -> list:
    if request.texts and request.token_ids:
        raise ServingError(Kind.INVALID, "set texts or token_ids, not both", param="input")
    if request.texts:
        return list(request.texts)
    if request.token_ids:
        return [{"prompt_token_ids": list(t.ids)} for t in request.token_ids]
    raise ServingError(Kind.INVALID, "input is empty: set texts or token_ids", param="input")


async def embed(ctx: ServingContext, request: pb.EmbedRequest) -> pb.EmbedResponse:
    """The response, or a `ServingError` for the caller to end the RPC with."""
    ctx.check_model(request.model)
    prompts = embed_inputs(request)
    try:
        params = PoolingParams(
            dimensions=_optional(request, "dimensions"),
            normalize=_optional(request, "normalize"),
            truncate_prompt_tokens=_optional(request, "truncate_prompt_tokens"),
            task=request.task or "embed",
        )
    except ValueError as e:
        raise classify(e) from e
    request_id = request.request_id or f"embd-{uuid.uuid4().hex}"
    outputs = await pool_all(ctx, prompts, params, request_id, priority=request.priority,
                             client_param="input")  # fmt: skip
    embeddings = [
        pb.Embedding(index=i, values=o.outputs.data.tolist(),
                     prompt_tokens=len(o.prompt_token_ids))
        for i, o in enumerate(outputs)
    ]  # fmt: skip
    return pb.EmbedResponse(
        request_id=request_id,
        embeddings=embeddings,
        prompt_tokens=sum(e.prompt_tokens for e in embeddings),
    )
