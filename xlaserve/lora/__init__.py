"""Multi-LoRA serving: PEFT adapters applied per request, many in one batch.

request.py (LoRARequest) -> manager.py (adapters by name, host cache) -> adapter.py (the
engine's form of a PEFT folder, its identity) -> the scheduler's slot rule (scheduling.py) ->
the input batch's device-slot LRU (slots.py) -> device.py (slot buffers, the jitted slot
write) -> kernels_pallas/lora (the grouped shrink/expand inside the model).
"""

from xlaserve.lora.request import LoRARequest

__all__ = ["LoRARequest"]
