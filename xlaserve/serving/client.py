"""A small Python client for xlaserve's gRPC API, sync and asyncio.

    with XlaServeClient("127.0.0.1:50051", api_key="...") as client:
        result = client.generate("The capital of France is", max_tokens=8, temperature=0)
        print(result.text, result.token_ids)
        for response in client.generate_stream({"prompt_token_ids": [1, 2, 3]}, max_tokens=4):
            print(response.samples[0].token_ids)

Sampling options are keyword arguments named like `SamplingParams`' fields, among them
`structured_outputs=` (a `StructuredOutputsParams` or its dict form, checked before sending):

        result = client.generate("Pick one:", structured_outputs={"choice": ["yes", "no"]})

Errors raise `grpc.RpcError` with the server's status code and message (INVALID_ARGUMENT for a
constraint the server's grammar backend refuses). Leaving a stream early cancels the call, which
aborts the request on the server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xlaserve.engine.outputs import PositionLogprobs
from xlaserve.serving.grpc_convert import position_from_proto, sampling_params_to_proto
from xlaserve.serving.proto import xlaserve_pb2 as pb
from xlaserve.serving.proto import xlaserve_pb2_grpc as pb_grpc


@dataclass
class SampleResult:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None


@dataclass
class GenerateResult:
    """A whole completion, assembled from the streamed responses."""

    request_id: str = ""
    samples: list[SampleResult] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs] | None = None
    usage: dict = field(default_factory=dict)
    finished: bool = False

    @property
    def text(self) -> str:
        return self.samples[0].text if self.samples else ""

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids if self.samples else []

    def add(self, response: pb.GenerateResponse) -> None:
        self.request_id = response.request_id
        self.finished = response.finished
        if response.prompt_token_ids:
            self.prompt_token_ids = list(response.prompt_token_ids)
        if response.prompt_logprobs:
            self.prompt_logprobs = [position_from_proto(p) for p in response.prompt_logprobs]
        u = response.usage
        self.usage = {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "cached_prompt_tokens": u.cached_prompt_tokens,
        }
        for delta in response.samples:
            while len(self.samples) <= delta.index:
                self.samples.append(SampleResult(len(self.samples)))
            sample = self.samples[delta.index]
            sample.token_ids.extend(delta.token_ids)
            sample.text += delta.text
            if delta.logprobs:
                sample.logprobs = (sample.logprobs or []) + [
                    position_from_proto(p) for p in delta.logprobs
                ]
            if delta.finish_reason:
                sample.finish_reason = delta.finish_reason
            which = delta.WhichOneof("stop_reason")
            if which is not None:
                sample.stop_reason = getattr(delta, which)
            if delta.HasField("cumulative_logprob"):
                sample.cumulative_logprob = delta.cumulative_logprob

    @classmethod
    def of(cls, responses: Iterable[pb.GenerateResponse]) -> GenerateResult:
        result = cls()
        for response in responses:
            result.add(response)
        return result


def build_request(
    prompt,
    *,
    request_id: str = "",
    priority: int = 0,
    model: str = "",
    add_special_tokens: bool | None = None,
    lora_name: str = "",
    images: list[bytes] = (),
    **sampling,
) -> pb.GenerateRequest:
    """prompt: text, a list of token ids, or {"prompt_token_ids": [...]}/{"prompt": text};
    lora_name: a loaded LoRA adapter to run under; images: encoded images, one per image
    placeholder of a text prompt (vision-language models)."""
    if isinstance(prompt, dict):
        prompt = prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else prompt["prompt"]
    request = pb.GenerateRequest(
        request_id=request_id,
        priority=priority,
        model=model,
        lora_name=lora_name,
        sampling_params=sampling_params_to_proto(**sampling),
        images=list(images),
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    return request


def _metadata(api_key: str | None) -> tuple:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class XlaServeClient:
    """Blocking client. `timeout` (seconds) is the default deadline of every call."""

    def __init__(self, target: str, *, api_key: str | None = None, timeout: float | None = None,
                 channel: grpc.Channel | None = None) -> None:  # fmt: skip
        self.channel = channel or grpc.insecure_channel(target)
        self.stub = pb_grpc.XlaServeStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = _metadata(api_key)
        self.timeout = timeout

    def generate_stream(self, prompt, *, timeout: float | None = None,
                        **kwargs) -> Iterator[pb.GenerateResponse]:  # fmt: skip
        call = self.stub.Generate(
            build_request(prompt, **kwargs), timeout=timeout or self.timeout, metadata=self.metadata
        )
        try:
            yield from call
        finally:
            call.cancel()  # no-op once finished; aborts the request when left early

    def generate(self, prompt, **kwargs) -> GenerateResult:
        return GenerateResult.of(self.generate_stream(prompt, **kwargs))

    def abort(self, request_id: str) -> bool:
        request = pb.AbortRequest(request_id=request_id)
        return self.stub.Abort(request, timeout=self.timeout, metadata=self.metadata).found

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> pb.LoRAAdapter:
        request = pb.LoadLoRAAdapterRequest(lora_name=lora_name, lora_path=lora_path)
        return self.stub.LoadLoRAAdapter(request, timeout=self.timeout, metadata=self.metadata)

    def unload_lora_adapter(self, lora_name: str) -> None:
        request = pb.UnloadLoRAAdapterRequest(lora_name=lora_name)
        self.stub.UnloadLoRAAdapter(request, timeout=self.timeout, metadata=self.metadata)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata
        )

    def health(self, service: str = "") -> str:
        """ "SERVING" or "NOT_SERVING" (grpc.health.v1)."""
        response = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> XlaServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncXlaServeClient:
    """asyncio client (grpc.aio); create it inside the event loop that uses it."""

    def __init__(self, target: str, *, api_key: str | None = None, timeout: float | None = None,
                 channel: grpc.aio.Channel | None = None) -> None:  # fmt: skip
        self.channel = channel or grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.XlaServeStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = _metadata(api_key)
        self.timeout = timeout

    async def generate_stream(self, prompt, *, timeout: float | None = None,
                              **kwargs) -> AsyncIterator[pb.GenerateResponse]:  # fmt: skip
        call = self.stub.Generate(
            build_request(prompt, **kwargs), timeout=timeout or self.timeout, metadata=self.metadata
        )
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def generate(self, prompt, **kwargs) -> GenerateResult:
        result = GenerateResult()
        async for response in self.generate_stream(prompt, **kwargs):
            result.add(response)
        return result

    async def abort(self, request_id: str) -> bool:
        request = pb.AbortRequest(request_id=request_id)
        response = await self.stub.Abort(request, timeout=self.timeout, metadata=self.metadata)
        return response.found

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata
        )

    async def health(self, service: str = "") -> str:
        response = await self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncXlaServeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
