"""Pooling requests from the servers: submitted through the server's one `submit` (the
engine's intake validates them), all or none, outputs in order."""

from __future__ import annotations

from xlaserve.engine.async_engine import EngineDeadError
from xlaserve.serving.context import ServingContext
from xlaserve.serving.errors import classify, failed_in_flight


async def pool_all(
    ctx: ServingContext,
    prompts: list,
    params,
    base_id: str,
    *,
    priority: int,
    client_param: str,
    add_special_tokens: bool = True,
) -> list:
    """Submits every prompt (all or none), then waits for each output, in order. A refusal is
    a `ServingError` whose "prompt" param is renamed to `client_param` (the field as sent)."""
    streams = []
    try:
        try:
            for i, prompt in enumerate(prompts):
                stream = await ctx.submit(
                    prompt, params, request_id=f"{base_id}-{i}", priority=priority,
                    add_special_tokens=add_special_tokens, check_length=False,
                )  # fmt: skip
                streams.append(stream)
            outputs = []
            for stream in streams:
                final = None
                async for output in stream:
                    final = output
                outputs.append(final)
            return outputs
        except EngineDeadError as e:
            raise failed_in_flight(e) from e
        except Exception as e:  # noqa: BLE001 - refused: named for the client
            error = classify(e)
            if error.param == "prompt":
                error.param = client_param
            raise error from e
    finally:
        for stream in streams:
            if not stream.finished:
                ctx.engine.abort_nowait(stream.request_id)
