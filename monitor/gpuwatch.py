"""GPU findings: what NVML shows that the locks do not.

- `gpu_busy_unlocked`: compute processes on a GPU that no lock holds, for longer than
  `nvml.busy_grace` (someone bypasses the lock; the next locked task will run out of memory).
- `released_gpu_busy`: processes still on a GPU at the pass after the monitor released its lock
  (a hung holder killed by the cap keeps its memory; the next task will run out of memory).
Each is reported once per episode.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from monitor import protocol
from monitor.events import Event
from monitor.gpu import GpuInfo, Nvml, device_for


class GpuWatch:
    def __init__(
        self,
        nvml: Nvml,
        devices: Mapping[str, int | str],
        busy_grace_s: float,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nvml = nvml
        self.devices = devices
        self.busy_grace_s = busy_grace_s
        self._mono = mono
        self.last: dict[int, GpuInfo] = {}
        self._busy_since: dict[int, float] = {}
        self._reported: set[int] = set()
        self._after_release: list[tuple[bytes, bytes, int]] = []

    def refresh(self) -> dict[int, GpuInfo]:
        """One NVML snapshot per pass; everything else in the pass reads this one."""
        self.last = self.nvml.snapshot()
        return self.last

    def for_lock(self, lock_key: bytes) -> GpuInfo | None:
        return device_for(lock_key, self.devices, self.last)

    def fields(self, lock_key: bytes) -> dict[str, Any]:
        """The `gpu` part of a lock's audit event, when the lock guards a local GPU."""
        info = self.for_lock(lock_key)
        return {} if info is None else {"gpu": info.as_dict()}

    def findings(
        self, held: Iterable[bytes], released: Iterable[tuple[bytes, bytes]]
    ) -> list[tuple[Event, dict[str, Any]]]:
        """Events for this pass, given the locks held now and those the monitor just released."""
        now = self._mono()
        held_devices = {info.index for key in held if (info := self.for_lock(key)) is not None}
        found: list[tuple[Event, dict[str, Any]]] = []
        for index in self._lockable():
            info = self.last[index]
            if info.processes and index not in held_devices:
                since = self._busy_since.setdefault(index, now)
                if now - since >= self.busy_grace_s and index not in self._reported:
                    self._reported.add(index)
                    found.append((Event.GPU_BUSY_UNLOCKED, {"busy_s": round(now - since, 1), "gpu": info.as_dict()}))
            else:
                self._busy_since.pop(index, None)
                self._reported.discard(index)
        for lock_key, holder, index in self._after_release:
            info = self.last.get(index)
            if info is not None and info.processes and index not in held_devices:
                found.append(
                    (
                        Event.RELEASED_GPU_BUSY,
                        {"lock_key": protocol.text(lock_key), "holder": protocol.text(holder), "gpu": info.as_dict()},
                    )
                )
        self._after_release = [
            (key, holder, info.index) for key, holder in released if (info := self.for_lock(key)) is not None
        ]
        return found

    def _lockable(self) -> list[int]:
        """The local devices that locks guard: those named in nvml.devices, else all."""
        if not self.devices:
            return sorted(self.last)
        indexes = set()
        for target in self.devices.values():
            for info in self.last.values():
                if target in (info.index, info.uuid):
                    indexes.add(info.index)
        return sorted(indexes)
