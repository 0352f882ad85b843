"""Protobuf messages <-> Python objects for xlaserve's gRPC API (used by server and client)."""

from __future__ import annotations

import json

from xlaserve.engine.outputs import Logprob, PositionLogprobs, RequestOutput
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.serving.deltas import SampleDelta, Usage, ranked_top
from xlaserve.serving.proto import xlaserve_pb2 as pb
from xlaserve.structured.params import StructuredOutputsParams

# proto3 `optional` scalars of pb.SamplingParams, named as in SamplingParams.
_OPTIONAL = ("n", "temperature", "top_k", "top_p", "min_p", "presence_penalty",
             "frequency_penalty", "repetition_penalty", "seed", "include_stop_str_in_output",
             "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
             "skip_special_tokens", "detokenize")  # fmt: skip
_REPEATED = ("stop", "stop_token_ids")
SAMPLING_FIELDS = frozenset(_OPTIONAL + _REPEATED + ("logit_bias", "structured_outputs"))


def sampling_params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Unset fields take SamplingParams' defaults, except max_tokens (unset: None, which the
    server replaces by its --max-tokens-default)."""
    kwargs: dict = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    kwargs.setdefault("max_tokens", None)
    for name in _REPEATED:
        if getattr(msg, name):
            kwargs[name] = list(getattr(msg, name))
    if msg.logit_bias:
        kwargs["logit_bias"] = dict(msg.logit_bias)
    if msg.HasField("structured_outputs"):
        kwargs["structured_outputs"] = structured_outputs_from_proto(msg.structured_outputs)
    return SamplingParams(**kwargs)


def structured_outputs_from_proto(msg: pb.StructuredOutputs) -> StructuredOutputsParams:
    """Raises `InvalidRequestError` (param "structured_outputs") for a bad constraint, including
    none set or a kind set but empty."""
    kwargs: dict = {"disable_any_whitespace": msg.disable_any_whitespace}
    if msg.HasField("whitespace_pattern"):
        kwargs["whitespace_pattern"] = msg.whitespace_pattern
    kind = msg.WhichOneof("kind")
    if kind == "json_schema":
        kwargs["json"] = msg.json_schema
    elif kind == "choice":
        kwargs["choice"] = list(msg.choice.options)
    elif kind is not None:
        kwargs[kind] = getattr(msg, kind)
    return StructuredOutputsParams(**kwargs)


def structured_outputs_to_proto(value: StructuredOutputsParams | dict) -> pb.StructuredOutputs:
    """A `StructuredOutputsParams` or its dict form (checked here, so the caller sees a bad
    constraint as `InvalidRequestError` before sending). A schema dict keeps its key order."""
    params = StructuredOutputsParams.from_dict(value)
    msg = pb.StructuredOutputs(disable_any_whitespace=params.disable_any_whitespace)
    if params.whitespace_pattern is not None:
        msg.whitespace_pattern = params.whitespace_pattern
    kind = params.kind
    if kind == "json":
        schema = params.json
        msg.json_schema = schema if isinstance(schema, str) else json.dumps(schema)
    elif kind == "choice":
        msg.choice.options.extend(params.choice)
    else:
        setattr(msg, kind, getattr(params, kind))
    return msg


def sampling_params_to_proto(**fields) -> pb.SamplingParams:
    """Keyword arguments named like SamplingParams' fields; None leaves a field unset."""
    unknown = set(fields) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(
            f"unknown sampling fields {sorted(unknown)}; known: {sorted(SAMPLING_FIELDS)}"
        )
    msg = pb.SamplingParams()
    for name, value in fields.items():
        if value is None:
            continue
        if name == "stop" and isinstance(value, str):
            value = [value]
        if name in _REPEATED:
            getattr(msg, name).extend(value)
        elif name == "logit_bias":
            msg.logit_bias.update({int(k): float(v) for k, v in value.items()})
        elif name == "structured_outputs":
            msg.structured_outputs.CopyFrom(structured_outputs_to_proto(value))
        else:
            setattr(msg, name, value)
    return msg


def _token_logprob(token_id: int, lp: Logprob) -> pb.TokenLogprob:
    msg = pb.TokenLogprob(
        token_id=token_id, logprob=lp.logprob, decoded_token=lp.decoded_token or ""
    )
    if lp.rank is not None:
        msg.rank = lp.rank
    return msg


def position_to_proto(token_id: int, position: PositionLogprobs) -> pb.PositionLogprobs:
    msg = pb.PositionLogprobs(token=_token_logprob(token_id, position[token_id]))
    msg.top.extend(_token_logprob(tid, lp) for tid, lp in ranked_top(position))
    return msg


def position_from_proto(msg: pb.PositionLogprobs) -> PositionLogprobs:
    """Back to the engine's {token_id: Logprob} form."""

    def one(t: pb.TokenLogprob) -> Logprob:
        return Logprob(t.logprob, t.rank if t.HasField("rank") else None, t.decoded_token)

    position = {t.token_id: one(t) for t in msg.top}
    position.setdefault(msg.token.token_id, one(msg.token))
    return position


def generate_response(
    output: RequestOutput, deltas: list[SampleDelta], *, first: bool
) -> pb.GenerateResponse:
    usage = Usage.of(output)
    response = pb.GenerateResponse(
        request_id=output.request_id,
        finished=output.finished,
        usage=pb.Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_prompt_tokens=usage.cached_prompt_tokens,
        ),
    )
    for d in deltas:
        sample = response.samples.add(index=d.index, token_ids=d.token_ids, text=d.text)
        if d.logprobs is not None:
            sample.logprobs.extend(
                position_to_proto(t, p) for t, p in zip(d.token_ids, d.logprobs, strict=True)
            )
        if d.finish_reason is not None:
            sample.finish_reason = d.finish_reason
        if isinstance(d.stop_reason, str):
            sample.stop_string = d.stop_reason
        elif d.stop_reason is not None:
            sample.stop_token_id = d.stop_reason
        if d.cumulative_logprob is not None:
            sample.cumulative_logprob = d.cumulative_logprob
    if first:
        response.prompt_token_ids.extend(output.prompt_token_ids)
        if output.prompt_logprobs is not None:
            ids = output.prompt_token_ids
            response.prompt_logprobs.extend(
                position_to_proto(ids[i], p)
                for i, p in enumerate(output.prompt_logprobs)
                if i > 0 and p is not None
            )
    return response
