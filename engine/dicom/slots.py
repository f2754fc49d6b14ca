"""Association slots: who holds one, since when it has been idle, and whom a newcomer displaces.

pynetdicom's own limit (`AE.maximum_associations`) refuses the newcomer, so ten SCUs that
C-ECHO every 20 s lock every modality out. Here the limit works the other way round, as for MLLP
connections: at `max_associations` the association idle longest makes room, and a calling AE at
`max_per_caller` displaces its own idle-longest association (a modality that rebooted without
releasing gets back in). Only when every candidate is busy (inside a DIMSE operation) is the
newcomer refused. Thread-safe: pynetdicom runs each association in its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["AssociationSlots", "Eviction", "SlotRefused"]


@dataclass
class _Slot:
    caller: str
    last_active: float
    busy: int = 0  # DIMSE operations in progress


@dataclass(frozen=True)
class Eviction:
    """An association that gave up its slot: the caller's AE title and how long it had been idle."""

    key: Hashable
    caller: str
    idle_seconds: float


class SlotRefused(Exception):
    """No slot can be freed (every candidate is busy): the newcomer gets A-ASSOCIATE-RJ."""


class AssociationSlots:
    def __init__(self, max_associations: int, max_per_caller: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_associations < 1 or max_per_caller < 1:
            raise ValueError("association limits must be at least 1")
        self.max_associations = max_associations
        self.max_per_caller = min(max_per_caller, max_associations)
        self._clock = clock
        self._slots: dict[Hashable, _Slot] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slots)

    def holders(self, caller: str) -> int:
        with self._lock:
            return sum(1 for s in self._slots.values() if s.caller == caller)

    def _idlest(self, now: float, caller: str | None) -> tuple[Hashable, _Slot] | None:
        best: tuple[Hashable, _Slot] | None = None
        for key, slot in self._slots.items():
            if slot.busy or (caller is not None and slot.caller != caller):
                continue
            if best is None or slot.last_active < best[1].last_active:
                best = (key, slot)
        return best

    def admit(self, key: Hashable, caller: str) -> list[Eviction]:
        """Give `key` a slot; returns the associations that must go to make room (already out of the table).

        Raises SlotRefused when the caller's cap or the global limit is reached and nobody there is idle.
        """
        with self._lock:
            now = self._clock()
            chosen: list[tuple[Hashable, _Slot]] = []
            if sum(1 for s in self._slots.values() if s.caller == caller) >= self.max_per_caller:
                own = self._idlest(now, caller)
                if own is None:
                    raise SlotRefused(f"calling AE at its limit of {self.max_per_caller} busy associations")
                chosen.append(own)
                del self._slots[own[0]]
            if len(self._slots) >= self.max_associations:
                other = self._idlest(now, None)
                if other is None:
                    for k, s in chosen:  # nothing was displaced after all
                        self._slots[k] = s
                    raise SlotRefused(f"all {self.max_associations} associations busy")
                chosen.append(other)
                del self._slots[other[0]]
            self._slots[key] = _Slot(caller, now)
            return [Eviction(k, s.caller, max(0.0, now - s.last_active)) for k, s in chosen]

    def begin(self, key: Hashable) -> None:
        """A DIMSE operation starts: the association is active and may not be displaced until `end`."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                slot.busy += 1
                slot.last_active = self._clock()

    def end(self, key: Hashable) -> None:
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                slot.busy = max(0, slot.busy - 1)
                slot.last_active = self._clock()

    def touch(self, key: Hashable) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.last_active = self._clock()  # one float store: no lock needed

    def leave(self, key: Hashable) -> None:
        with self._lock:
            self._slots.pop(key, None)
