"""What both servers share: the async engine, metrics, health, options, model facts."""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
from dataclasses import dataclass

from xlaserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from xlaserve.engine.intake import PromptType
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.lora.request import LoRARequest
from xlaserve.serving.errors import Kind, ServingError, classify
from xlaserve.serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)

_OUTCOME = {
    Kind.INVALID: "invalid",
    Kind.NOT_FOUND: "invalid",
    Kind.TOO_LARGE: "invalid",
    Kind.UNAUTHENTICATED: "unauthenticated",
    Kind.OVERLOADED: "overloaded",
    Kind.UNAVAILABLE: "unavailable",
    Kind.INTERNAL: "error",
}


@dataclass(frozen=True)
class ServerConfig:
    """How `serve` runs. A port of 0 picks a free one; None leaves that server off."""

    host: str = "127.0.0.1"
    grpc_port: int | None = 50051
    http_port: int | None = 8000
    api_key: str | None = None  # required (Bearer) on every route and method but health
    served_model_name: str | None = None  # default: the engine's model name
    max_body_bytes: int = 4 << 20  # HTTP request bodies and gRPC messages
    drain_timeout_s: float = 30.0  # on shutdown: in-flight requests get this long to finish
    failure_exit_delay_s: float = 2.0  # after an engine failure, report NOT_SERVING this long
    # Reads tool calls from free output for tool_choice "auto" (hermes, llama3_json); None:
    # "auto" is refused (required, named functions and "none" need no parser).
    tool_call_parser: str | None = None
    # A second gRPC listener serving only JetStream's Orchestrator (and health), for JetStream
    # clients, which cannot send an API key. Its key: jetstream_api_key, else api_key; none at
    # all only with jetstream_no_auth (the operator's explicit choice, warned about).
    jetstream_port: int | None = None
    jetstream_api_key: str | None = None
    jetstream_no_auth: bool = False
    # Limits on one request (serving/limits.py): samples (n / num_samples) at most max_n;
    # max_tokens above max_tokens_cap (None: no cap) refused; gRPC Generate and JetStream Decode
    # requests that do not set max_tokens get max_tokens_default (HTTP keeps vLLM's defaults).
    max_n: int = 16
    max_tokens_default: int = 256
    max_tokens_cap: int | None = None
    # LoRA: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (and the gRPC Load/Unload
    # RPCs) change the served adapters at run time only when this is on (they need the API
    # key like every other route).
    allow_runtime_lora_loading: bool = False
    # (name, PEFT folder) adapters loaded at start-up (`--lora-modules name=path ...`); the
    # engine needs enable_lora.
    lora_modules: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        limits = {"max_n": self.max_n, "max_tokens_default": self.max_tokens_default}
        if self.max_tokens_cap is not None:
            limits["max_tokens_cap"] = self.max_tokens_cap
        for name, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("grpc_port", "http_port", "jetstream_port"):
            port = getattr(self, name)
            if port is not None and (not isinstance(port, int) or not 0 <= port <= 65535):
                raise ValueError(f"{name} must be in [0, 65535] or None, got {port!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty (or None for no authentication)")
        if self.jetstream_api_key is not None and not self.jetstream_api_key:
            raise ValueError("jetstream_api_key must be non-empty (or None)")
        if self.jetstream_no_auth and self.jetstream_api_key is not None:
            raise ValueError("jetstream_no_auth and jetstream_api_key contradict each other")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.tool_call_parser is not None:
            from xlaserve.tools.parsers import get_parser

            get_parser(self.tool_call_parser)  # raises ValueError naming the choices


def bearer_matches(authorization: str | None, key: str | None) -> bool:
    """Whether an `authorization` value ("Bearer <key>") carries `key` (None: no key needed)."""
    if key is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), key)


STARTING = "the server is starting: the model is loading and compiling (warm-up); retry later"


class ServingContext:
    """Lives on the servers' event loop; the engine thread reaches it only through
    `call_soon_threadsafe`.

    The servers start before the engine exists (`engine=None`: "starting"), so that ports are
    taken at once and health can answer; `attach` hands the ready engine over. Until then
    `engine` raises an UNAVAILABLE `ServingError` saying the server is starting."""

    def __init__(self, engine: AsyncEngine | None, config: ServerConfig) -> None:
        self._engine: AsyncEngine | None = None
        self.config = config
        self.model_name = config.served_model_name or "default"
        self.metrics = ServingMetrics(
            self._engine_metrics, lambda: self.healthy, model_name=lambda: self.model_name
        )
        self.draining = False
        self.adapters: dict = {}  # LoRA adapter name -> AdapterInfo, served as models
        self.failed = asyncio.Event()
        self._health_changed = asyncio.Event()
        if engine is not None:
            self.attach(engine)

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise ServingError(Kind.UNAVAILABLE, STARTING, code="starting")
        return self._engine

    def attach(self, engine: AsyncEngine) -> None:
        """The engine is ready (built and warmed up): requests and health use it from now on."""
        self._engine = engine
        self.model_name = self.config.served_model_name or engine.model_name or "default"
        list_loras = getattr(engine.engine, "list_loras", None)  # loaded before it started
        self.adapters = {a.name: a for a in (list_loras() if list_loras else [])}
        self._notify_health()

    def _engine_metrics(self) -> dict:
        if self._engine is None:  # starting: every engine gauge and counter reads 0
            return collections.defaultdict(int)
        return self._engine.metrics()

    # ---- health ------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._engine is not None and self._engine.is_serving and not self.draining

    @property
    def has_engine(self) -> bool:
        return self._engine is not None

    @property
    def starting(self) -> bool:
        return self._engine is None and not self.draining and not self.failed.is_set()

    def on_engine_death(self, error: EngineDeadError) -> None:
        logger.error("engine failed, reporting NOT_SERVING: %s", error)
        self.failed.set()
        self._notify_health()

    def begin_drain(self) -> None:
        self.draining = True
        if self._engine is not None:
            self._engine.begin_drain()
        self._notify_health()

    def _notify_health(self) -> None:
        event, self._health_changed = self._health_changed, asyncio.Event()
        event.set()

    async def health_changed(self) -> None:
        await self._health_changed.wait()

    # ---- requests ----------------------------------------------------------------------------
    def authorized(self, authorization: str | None) -> bool:
        """Checks an `authorization` header/metadata value ("Bearer <key>")."""
        return bearer_matches(authorization, self.config.api_key)

    def check_model(self, name: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's model name selects (None: the base model); an unknown
        name is NOT_FOUND naming what is served."""
        if self._engine is None:  # every request is refused with "starting" until ready
            raise ServingError(Kind.UNAVAILABLE, STARTING, code="starting")
        if not name or name == self.model_name:
            return None
        adapter = self.adapters.get(name)
        if adapter is not None:
            # No path: the engine uses the adapter loaded under this name, or refuses the
            # request if it was unloaded meanwhile (it never reads the folder again).
            return LoRARequest(adapter.name, adapter.lora_int_id)
        served = ", ".join(repr(n) for n in [self.model_name, *self.adapters])
        raise ServingError(
            Kind.NOT_FOUND,
            f"model {name!r} does not exist: this server serves {served}",
            param="model",
            code="model_not_found",
        )

    # ---- LoRA adapters at run time -----------------------------------------------------------
    def _check_runtime_loading(self) -> None:
        if not self.config.allow_runtime_lora_loading:
            raise ServingError(
                Kind.NOT_FOUND,
                "loading and unloading LoRA adapters at run time is off: start the server "
                "with --allow-runtime-lora-loading",
                code="runtime_lora_loading_off",
            )

    async def load_adapter(self, name: object, path: object):
        """Loads a PEFT folder as a servable model name; its AdapterInfo."""
        self._check_runtime_loading()
        for param, value in (("lora_name", name), ("lora_path", path)):
            if not isinstance(value, str) or not value:
                raise ServingError(Kind.INVALID, f"{param} must be a non-empty string",
                                   param=param)  # fmt: skip
        if name == self.model_name or name in self.adapters:
            raise ServingError(Kind.INVALID, f"a model named {name!r} is already served",
                               param="lora_name")  # fmt: skip
        lora_id = 1 + max((a.lora_int_id for a in self.adapters.values()), default=0)
        try:
            info = await self.engine.add_lora(LoRARequest(name, lora_id, path))
        except Exception as e:  # noqa: BLE001 - classified for the client
            raise classify(e) from e
        self.adapters[name] = info
        return info

    async def unload_adapter(self, name: object) -> None:
        self._check_runtime_loading()
        if not isinstance(name, str) or name not in self.adapters:
            raise ServingError(Kind.NOT_FOUND, f"no LoRA adapter named {name!r} is loaded",
                               param="lora_name")  # fmt: skip
        try:
            await self.engine.remove_lora(name)
        except Exception as e:  # noqa: BLE001
            raise classify(e) from e
        del self.adapters[name]

    def refuse(self, exc: BaseException) -> ServingError:
        """The error to send for a request refused before it started (counted)."""
        error = classify(exc)
        if error.kind is Kind.INTERNAL:
            logger.error("request refused by an internal error", exc_info=exc)
        self.count_refusal(error)
        return error

    def count_refusal(self, error: ServingError) -> None:
        self.metrics.refused(_OUTCOME[error.kind])

    async def submit(
        self,
        prompt: PromptType,
        params: SamplingParams,
        *,
        request_id: str | None = None,
        priority: int = 0,
        add_special_tokens: bool = True,
        check_length: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """Adds a request; a refusal is raised as a `ServingError` (not yet counted)."""
        lora = {} if lora_request is None else {"lora_request": lora_request}
        try:
            return await self.engine.add_request(
                prompt,
                params,
                request_id=request_id,
                priority=priority,
                add_special_tokens=add_special_tokens,
                check_length=check_length,
                **lora,
            )
        except Exception as e:  # noqa: BLE001 - classified for the client
            raise classify(e) from e

    def model_info(self) -> dict:
        engine = self.engine.engine
        device = engine.device_info()
        return {
            "model_name": self.model_name,
            "max_model_len": self.engine.max_model_len,
            "vocab_size": self.engine.vocab_size,
            "dtype": self.engine.dtype,
            "mesh_shape": dict(device.mesh_shape),
            "platform": device.platform,
            "num_devices": device.num_devices,
            "eos_token_ids": list(self.engine.eos_token_ids),
            "max_num_seqs": engine.max_num_seqs,
            "page_size": engine.page_size,
            "num_kv_pages": self.engine.metrics()["kv_pages_total"],
        }
