"""Device slots for adapters: which adapter sits in which slot, least recently used first out.

Slot 0 means no adapter; slots 1..max_loras hold adapters. Device-free: the input
batch asks for the slots of one step's adapters and gets back the slot writes to make first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xlaserve.lora.adapter import LoRAAdapter


class SlotManager:
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._slots: OrderedDict[str, int] = OrderedDict()  # identity -> slot, LRU first
        self._free = list(range(max_loras, 0, -1))  # pop() hands out slot 1 first
        self.num_loads = 0

    def slot_of(self, identity: str) -> int | None:
        return self._slots.get(identity)

    def assign(self, adapters: Iterable[LoRAAdapter]) -> list[tuple[int, LoRAAdapter]]:
        """Makes every adapter of one step resident; returns the (slot, adapter) writes to do
        before the step runs. Adapters of the step are never evicted by each other."""
        step = {a.identity: a for a in adapters}
        if len(step) > self.max_loras:
            raise RuntimeError(f"{len(step)} adapters in one step, but only {self.max_loras} "
                               "slots (the scheduler keeps them within max_loras)")  # fmt: skip
        writes = []
        for identity in step:
            if identity in self._slots:
                self._slots.move_to_end(identity)
        for identity, adapter in step.items():
            if identity in self._slots:
                continue
            if self._free:
                slot = self._free.pop()
            else:  # the least recently used adapter not in this step (they are at the end)
                victim = next(k for k in self._slots if k not in step)
                slot = self._slots.pop(victim)
            self._slots[identity] = slot
            writes.append((slot, adapter))
            self.num_loads += 1
        return writes
