"""`LoRARequest`: which adapter a request runs under (vLLM's names). Standard library only."""

from __future__ import annotations

from dataclasses import dataclass

from xlaserve.errors import InvalidRequestError


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter to apply to one request.

    lora_name: the adapter's name (what an OpenAI request puts in `model`);
    lora_int_id: a positive int naming the adapter uniquely in this engine;
    lora_path: the PEFT folder (adapter_config.json + adapter_model.safetensors or .bin).
    The engine loads the folder the first time the name is used; later requests with the same
    name reuse it. What a request's KV cache is shared under is the adapter's weights (their
    hash), never its name.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name.strip():
            raise InvalidRequestError(
                "lora_name", f"lora_name must be a non-empty string, got {self.lora_name!r}"
            )
        i = self.lora_int_id
        if isinstance(i, bool) or not isinstance(i, int) or i < 1:
            raise InvalidRequestError("lora_int_id", f"lora_int_id must be an int >= 1, got {i!r}")
        if not isinstance(self.lora_path, str):
            raise InvalidRequestError(
                "lora_path", f"lora_path must be a string, got {type(self.lora_path).__name__}"
            )
