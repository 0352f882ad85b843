"""What both servers share: the async engine, metrics, health, options, model facts."""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass

from xlaserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from xlaserve.engine.intake import PromptType
from xlaserve.engine.sampling_params import SamplingParams
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

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if port is not None and (not isinstance(port, int) or not 0 <= port <= 65535):
                raise ValueError(f"{name} must be in [0, 65535] or None, got {port!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty (or None for no authentication)")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.tool_call_parser is not None:
            from xlaserve.tools.parsers import get_parser

            get_parser(self.tool_call_parser)  # raises ValueError naming the choices


class ServingContext:
    """Lives on the servers' event loop; the engine thread reaches it only through
    `call_soon_threadsafe`."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.model_name = config.served_model_name or engine.model_name or "default"
        self.metrics = ServingMetrics(engine.metrics, lambda: self.healthy)
        self.draining = False
        self.failed = asyncio.Event()
        self._health_changed = asyncio.Event()

    # ---- health ------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.engine.is_serving and not self.draining

    def on_engine_death(self, error: EngineDeadError) -> None:
        logger.error("engine failed, reporting NOT_SERVING: %s", error)
        self.failed.set()
        self._notify_health()

    def begin_drain(self) -> None:
        self.draining = True
        self.engine.begin_drain()
        self._notify_health()

    def _notify_health(self) -> None:
        event, self._health_changed = self._health_changed, asyncio.Event()
        event.set()

    async def health_changed(self) -> None:
        await self._health_changed.wait()

    # ---- requests ----------------------------------------------------------------------------
    def authorized(self, authorization: str | None) -> bool:
        """Checks an `authorization` header/metadata value ("Bearer <key>")."""
        key = self.config.api_key
        if key is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), key)

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_name:
            raise ServingError(
                Kind.NOT_FOUND,
                f"model {name!r} does not exist: this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

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
    ) -> RequestStream:
        """Adds a request; a refusal is raised as a `ServingError` (not yet counted)."""
        try:
            return await self.engine.add_request(
                prompt,
                params,
                request_id=request_id,
                priority=priority,
                add_special_tokens=add_special_tokens,
                check_length=check_length,
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
