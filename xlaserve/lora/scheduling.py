"""The scheduler's adapter rule: at most `max_loras` distinct adapters among running sequences,
so every step fits the device slots. Standard library only.

Admission walks the waiting queue in policy order. A sequence whose adapter would be one too
many is blocked, and from then on in this pass no sequence with an adapter is admitted (not even
one whose adapter is running: that would keep the adapter resident and could starve the blocked
one). Sequences without an adapter still go. Running sequences finish, their adapters leave,
and the blocked sequence is admitted first: no deadlock, no starvation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


class AdapterAdmission:
    """One admission pass's view of the running adapters."""

    def __init__(self, max_loras: int | None, running_keys: Iterable[str | None]) -> None:
        self.max_loras = max_loras
        self.running = Counter(k for k in running_keys if k is not None)
        self.blocked = False

    def may_admit(self, key: str | None) -> bool:
        """Whether a sequence with adapter `key` (None: the base model) may be admitted now;
        a refusal for want of a slot blocks later adapter sequences of this pass."""
        if key is None or self.max_loras is None:
            return True
        if self.blocked:
            return False
        if key not in self.running and len(self.running) >= self.max_loras:
            self.blocked = True
            return False
        return True

    def admitted(self, key: str | None) -> None:
        if key is not None:
            self.running[key] += 1
