"""A stand-in for the `pynvml` module, at the one boundary where a fake is right: CI has no GPU.

It mirrors the real binding's shapes: NVMLError subclasses carry `.value` (the nvml.h code),
NVMLLibraryMismatchError does NOT derive from NVMLError, results are small objects.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class NVMLLibraryMismatchError(Exception):
    pass


NOT_SUPPORTED, DRIVER_NOT_LOADED, LIBRARY_NOT_FOUND, FUNCTION_NOT_FOUND, GPU_IS_LOST, LIB_RM_VERSION_MISMATCH = (
    3, 9, 12, 13, 15, 18,
)  # fmt: skip


@dataclass
class Device:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    used: int = 1 << 30
    total: int = 80 << 30
    util: int = 37
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)
    lost: bool = False  # fallen off the bus: even its handle fails
    process_names: dict[int, str] = field(default_factory=dict)  # what NVML may name (own user's)


class FakeNvml:
    """Build one, configure it, then pass `.module` where the real `pynvml` would go."""

    def __init__(
        self,
        devices: list[Device],
        *,
        init_error: int | Exception | None = None,
        old_driver: bool = False,
        count_fails: bool = False,
    ) -> None:
        self.devices = devices
        self.init_error = init_error
        self.count_fails = count_fails
        self.old_driver = old_driver
        self.calls: list[str] = []
        self.shutdowns = 0
        self.module = self._module()

    def _module(self) -> types.ModuleType:  # noqa: C901 - mccabe adds up the one-branch stand-ins nested here
        fake = self
        m = types.ModuleType("pynvml")
        m.NVMLError = NVMLError
        m.NVMLLibraryMismatchError = NVMLLibraryMismatchError

        def call(name, index, fn):
            fake.calls.append(f"{name}:{index}")
            if name in fake.devices[index].unsupported:
                raise NVMLError(NOT_SUPPORTED)
            return fn(fake.devices[index])

        def init():
            fake.calls.append("init")
            if isinstance(fake.init_error, Exception):
                raise fake.init_error
            if fake.init_error is not None:
                raise NVMLError(fake.init_error)

        def shutdown():
            fake.shutdowns += 1

        def processes(h):
            if fake.old_driver:
                raise NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not match")
            return processes_v2(h)

        def processes_v2(h):
            return call(
                "processes", h, lambda d: [types.SimpleNamespace(pid=p, usedGpuMemory=u) for p, u in d.processes]
            )

        m.nvmlInit = init
        m.nvmlShutdown = shutdown

        def count():
            if fake.count_fails:
                raise NVMLError(GPU_IS_LOST)
            return len(fake.devices)

        def handle(i):
            if fake.devices[i].lost:
                raise NVMLError(GPU_IS_LOST)
            return i

        m.nvmlDeviceGetCount = count
        m.nvmlDeviceGetHandleByIndex = handle
        m.nvmlDeviceGetUUID = lambda h: call("uuid", h, lambda d: d.uuid)
        m.nvmlDeviceGetName = lambda h: call("name", h, lambda d: d.name.encode())
        m.nvmlDeviceGetMemoryInfo = lambda h: call(
            "memory", h, lambda d: types.SimpleNamespace(used=d.used, total=d.total)
        )
        m.nvmlDeviceGetUtilizationRates = lambda h: call(
            "util", h, lambda d: types.SimpleNamespace(gpu=d.util, memory=0)
        )
        m.nvmlDeviceGetComputeRunningProcesses = processes
        m.nvmlDeviceGetComputeRunningProcesses_v2 = processes_v2

        def process_name(pid):
            for d in fake.devices:
                if pid in d.process_names:
                    return d.process_names[pid].encode()
            raise NVMLError(NOT_SUPPORTED)  # as for another user's process

        m.nvmlSystemGetProcessName = process_name
        return m
