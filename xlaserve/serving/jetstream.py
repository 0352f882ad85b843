"""JetStream's `jetstream_proto.Orchestrator` over xlaserve's engine, so JetStream clients and
its benchmark scripts work unchanged.

Decode samples greedily (JetStream's servers sample as configured at start-up; the request
carries no sampling options), `max_tokens` 0 (unset) means the server's --max-tokens-default,
and a prompt that does not leave room for `max_tokens` is cut at max_model_len rather than
refused, as in JetStream. `num_samples` above --max-n and `max_tokens` above --max-tokens-cap are
refused (serving/limits.py). Each response carries every sample (`num_samples` of them, in
order) with the token ids and text it added; a sample without news that step has empty fields.

`has_bos` is JetStream's: false (the default) means the content lacks the beginning-of-sequence
token, so text is tokenized with the model's special tokens and token ids get the model's BOS
put in front (unless they already start with it: JetStream's own benchmark sends ids from a
tokenizer that added one, and JetStream would then decode after two); true means the content
already has it, so nothing is added. `lora_adapter_id` names a loaded LoRA adapter (what an
OpenAI request puts in `model`); empty is the base model.
"""

from __future__ import annotations

from xlaserve.engine.async_engine import EngineDeadError
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.serving.context import ServingContext
from xlaserve.serving.deltas import DeltaTracker
from xlaserve.serving.errors import Kind, ServingError, failed_in_flight
from xlaserve.serving.limits import limited
from xlaserve.serving.proto import jetstream_pb2 as js
from xlaserve.serving.proto import jetstream_pb2_grpc as js_grpc

JETSTREAM_SERVICE = js.DESCRIPTOR.services_by_name["Orchestrator"].full_name


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] when the model's tokenizer puts it in front of a text, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a private copy: the engine thread may be using this one
        from tokenizers import Tokenizer

        own = Tokenizer.from_str(backend.to_str())
        with_special = own.encode("a", add_special_tokens=True).ids
        plain = own.encode("a", add_special_tokens=False).ids
    else:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


def _adapter(ctx: ServingContext, name: str):
    """The LoRARequest of a loaded adapter named by lora_adapter_id (None: the base model)."""
    if not name:
        return None
    if name not in ctx.adapters:
        loaded = ", ".join(repr(n) for n in ctx.adapters) or "none"
        raise ServingError(
            Kind.INVALID,
            f"lora_adapter_id {name!r} names no loaded LoRA adapter (loaded: {loaded}); "
            "leave it empty for the base model",
        )
    return ctx.check_model(name)


def _decode_args(request: js.DecodeRequest, bos: list[int]):
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
            Kind.INVALID,
            f"max_tokens must be >= 0 (0: the server's default), got {request.max_tokens}",
        )
    if request.num_samples < 0:
        raise ServingError(Kind.INVALID, f"num_samples must be >= 0, got {request.num_samples}")
    if which == "text_content":
        prompt = request.text_content.text
    else:
        ids = list(request.token_content.token_ids)
        if not request.has_bos and ids[: len(bos)] != bos:
            ids = bos + ids
        prompt = {"prompt_token_ids": ids}
    params = SamplingParams(
        n=max(request.num_samples, 1), temperature=0.0, max_tokens=request.max_tokens or None
    )
    return prompt, params


class OrchestratorServicer(js_grpc.OrchestratorServicer):
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self._bos: list[int] | None = None  # read from the engine's tokenizer once it is ready

    @property
    def bos(self) -> list[int]:
        if self._bos is None:
            self._bos = bos_prefix(self.ctx.engine.tokenizer)
        return self._bos

    async def Decode(self, request: js.DecodeRequest, context):
        ctx = self.ctx
        try:
            lora = _adapter(ctx, request.lora_adapter_id)
            prompt, params = _decode_args(request, self.bos)
            params = limited(
                params,
                max_n=ctx.config.max_n,
                asked=request.max_tokens or None,
                default=ctx.config.max_tokens_default,
                cap=ctx.config.max_tokens_cap,
                n_param="num_samples",
            )
        except Exception as e:  # noqa: BLE001
            error = ctx.refuse(e)
            await context.abort(error.kind.grpc_code, error.message)
        try:
            stream = await ctx.submit(
                prompt,
                params,
                priority=request.priority,
                add_special_tokens=not request.has_bos,
                check_length=False,
                lora_request=lora,
            )
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
