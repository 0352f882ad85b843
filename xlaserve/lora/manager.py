"""The host side of multi-LoRA: adapters known by name, and an LRU cache of their weights.

`max_cpu_loras` adapters keep their weights in host memory; an adapter pushed out is read from
its folder again when next used (and must still hold the same weights: its identity is
checked). Requests and the runner's input batch hold the adapter they use by reference, so a
running request is never affected by eviction, unloading or a reload under the same name.

Not thread-safe: the engine thread owns it (servers reach it through the async engine).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from xlaserve.checkpoints.peft import read_peft_folder
from xlaserve.errors import InvalidRequestError
from xlaserve.lora.adapter import LoRAAdapter, adapter_from_peft
from xlaserve.lora.request import LoRARequest


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int  # adapters resident on the device at once (device slots)
    max_lora_rank: int  # ranks up to this are zero-padded to it
    max_cpu_loras: int  # adapters whose weights stay in host memory

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                             f"({self.max_loras})")  # fmt: skip


@dataclass(frozen=True)
class AdapterInfo:
    """What `list_adapters` reports (the OpenAI server's /v1/models)."""

    name: str
    lora_int_id: int
    path: str
    identity: str
    rank: int


class LoRAManager:
    def __init__(self, config: LoRAConfig, model_config) -> None:
        self.config = config
        self.model_config = model_config
        self._known: dict[str, tuple[LoRARequest, str, int]] = {}  # name -> (request, id, rank)
        self._cache: OrderedDict[str, LoRAAdapter] = OrderedDict()  # name -> weights (LRU)
        self.loads_from_disk = 0

    # ---- registry ---------------------------------------------------------------------------
    def add(self, request: LoRARequest) -> LoRAAdapter:
        """Reads and registers an adapter. A name already registered is refused."""
        if not isinstance(request, LoRARequest):
            raise InvalidRequestError("lora_request", f"lora_request must be a LoRARequest, "
                                      f"got {type(request).__name__}")  # fmt: skip
        if request.lora_name in self._known:
            raise InvalidRequestError(
                "lora_name", f"a LoRA adapter named {request.lora_name!r} is already loaded"
            )
        for other, (known, _, _) in self._known.items():
            if known.lora_int_id == request.lora_int_id:
                raise InvalidRequestError(
                    "lora_int_id",
                    f"lora_int_id {request.lora_int_id} is already used by adapter {other!r}",
                )
        adapter = self._read(request)
        self._known[request.lora_name] = (request, adapter.identity, adapter.rank)
        self._remember(adapter)
        return adapter

    def remove(self, name: str) -> None:
        if name not in self._known:
            raise InvalidRequestError("lora_name", f"no LoRA adapter named {name!r} is loaded")
        del self._known[name]
        self._cache.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._known

    def list_adapters(self) -> list[AdapterInfo]:
        return [AdapterInfo(name, req.lora_int_id, req.lora_path, identity, rank)
                for name, (req, identity, rank) in self._known.items()]  # fmt: skip

    # ---- lookups ----------------------------------------------------------------------------
    def get(self, name: str) -> LoRAAdapter:
        """A registered adapter's weights (read again if the host cache let them go)."""
        if name not in self._known:
            raise InvalidRequestError("model", f"no LoRA adapter named {name!r} is loaded")
        adapter = self._cache.get(name)
        if adapter is None:
            request, identity, _ = self._known[name]
            adapter = self._read(request)
            if adapter.identity != identity:
                raise InvalidRequestError(
                    "lora_path",
                    f"the weights of LoRA adapter {name!r} in {request.lora_path} changed on "
                    "disk since it was loaded; unload and load it again",
                )
            self._remember(adapter)
        self._cache.move_to_end(name)
        return adapter

    def resolve(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter a request names: loaded on first use (vLLM's offline behaviour). A
        request without a path names an adapter that must already be loaded (serving)."""
        if not isinstance(request, LoRARequest):
            raise InvalidRequestError("lora_request", f"lora_request must be a LoRARequest, "
                                      f"got {type(request).__name__}")  # fmt: skip
        known = self._known.get(request.lora_name)
        if known is None:
            if not request.lora_path:
                raise InvalidRequestError(
                    "model", f"no LoRA adapter named {request.lora_name!r} is loaded"
                )
            return self.add(request)
        registered = known[0]
        if request.lora_int_id != registered.lora_int_id:
            raise InvalidRequestError(
                "lora_int_id",
                f"LoRA adapter {request.lora_name!r} is loaded with lora_int_id "
                f"{registered.lora_int_id}, not {request.lora_int_id}",
            )
        if request.lora_path and request.lora_path != registered.lora_path:
            raise InvalidRequestError(
                "lora_request",
                f"LoRA adapter {request.lora_name!r} is loaded from {registered.lora_path}, "
                f"not {request.lora_path}",
            )
        return self.get(request.lora_name)

    # ---- internals --------------------------------------------------------------------------
    def _read(self, request: LoRARequest) -> LoRAAdapter:
        folder = read_peft_folder(request.lora_path)
        self.loads_from_disk += 1
        return adapter_from_peft(
            folder, request.lora_name, self.model_config, self.config.max_lora_rank
        )

    def _remember(self, adapter: LoRAAdapter) -> None:
        self._cache[adapter.name] = adapter
        self._cache.move_to_end(adapter.name)
        while len(self._cache) > self.config.max_cpu_loras:
            self._cache.popitem(last=False)
