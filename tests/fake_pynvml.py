"""A stand-in for the `pynvml` module, at the one boundary where a fake is right: CI has no GPU.

It mirrors the real binding's shapes: NVMLError subclasses carry `.value` (the nvml.h code),
NVMLLibraryMismatchError does NOT derive from NVMLError, results are small objects;
nvmlDeviceGetSamples returns (value type, samples) and raises NOT_FOUND when nothing is newer than
the timestamp asked for; nvmlEventSetWait_v2 raises TIMEOUT when no event comes in time.

Old drivers and bindings: a name in `absent` is not in the module at all (a binding that
predates it); one in `no_symbol` raises FUNCTION_NOT_FOUND (a binding newer than the driver).
A call name in a Device's `unsupported` raises NOT_SUPPORTED for that device.
"""

from __future__ import annotations

import queue
import threading
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
NOT_FOUND, TIMEOUT, UNKNOWN = 6, 10, 999
TOTAL_POWER_SAMPLES, GPU_UTILIZATION_SAMPLES, MEMORY_UTILIZATION_SAMPLES = 0, 1, 2
XID_CRITICAL_ERROR = 0x8
UINT = 1  # NVML_VALUE_TYPE_UNSIGNED_INT: what power, utilisation and clock samples come as


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
    memory_util: int = 12
    power_mw: int = 250_000
    power_limit_mw: int = 700_000
    sm_clock: int = 1755
    sm_clock_max: int = 1980
    # sample type -> [(timestamp in microseconds, value)], as the driver's buffer holds them
    samples: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    sample_value_type: int = UINT
    events: int = 0xFFFF  # the event types it supports (nvmlDeviceGetSupportedEventTypes)


class FakeNvml:
    """Build one, configure it, then pass `.module` where the real `pynvml` would go."""

    def __init__(
        self,
        devices: list[Device],
        *,
        init_error: int | Exception | None = None,
        old_driver: bool = False,
        count_fails: bool = False,
        absent: frozenset[str] = frozenset(),
        no_symbol: frozenset[str] = frozenset(),
        event_set_error: int | None = None,
    ) -> None:
        self.devices = devices
        self.init_error = init_error
        self.count_fails = count_fails
        self.old_driver = old_driver
        self.no_symbol = set(no_symbol)
        self.event_set_error = event_set_error
        self.calls: list[str] = []
        self.shutdowns = 0
        self.sample_asks: list[tuple[int, int, int]] = []  # (device, type, last timestamp) per call
        self.events: queue.Queue[types.SimpleNamespace | int] = queue.Queue()
        self.registered: list[int] = []
        self.event_sets_freed = 0
        self.waits = 0
        self.waiting = threading.Event()  # set while a wait is in progress
        self.module = self._module()
        self._events_module(self.module)
        self._readings_module(self.module)
        for name in absent:
            delattr(self.module, name)

    def xid(self, index: int, code: int, gi: int = 0xFFFFFFFF, ci: int = 0xFFFFFFFF) -> None:
        """The driver reports Xid `code` on device `index` (gi/ci: its MIG instance, or none)."""
        self.events.put(
            types.SimpleNamespace(
                device=index, eventType=XID_CRITICAL_ERROR, eventData=code, gpuInstanceId=gi, computeInstanceId=ci
            )
        )

    def event(self, item: types.SimpleNamespace | int) -> None:
        """Any event, or an int: the next wait raises NVMLError(that code)."""
        self.events.put(item)

    def _symbol(self, name: str) -> None:
        if name in self.no_symbol:
            raise NVMLError(FUNCTION_NOT_FOUND)

    def _events_module(self, m: types.ModuleType) -> None:
        fake = self

        def create():
            fake._symbol("nvmlEventSetCreate")
            if fake.event_set_error is not None:
                raise NVMLError(fake.event_set_error)
            return types.SimpleNamespace(name="event set")

        def supported(h):
            fake._symbol("nvmlDeviceGetSupportedEventTypes")
            if "supported_events" in fake.devices[h].unsupported:
                raise NVMLError(NOT_SUPPORTED)
            return fake.devices[h].events

        def register(h, types_, event_set):
            fake._symbol("nvmlDeviceRegisterEvents")
            if "events" in fake.devices[h].unsupported:
                raise NVMLError(NOT_SUPPORTED)
            assert types_ == XID_CRITICAL_ERROR
            fake.registered.append(h)

        def wait(event_set, timeout_ms):
            fake._symbol("nvmlEventSetWait_v2")
            fake.waits += 1
            fake.waiting.set()
            try:
                item = fake.events.get(timeout=timeout_ms / 1000)
            except queue.Empty:
                raise NVMLError(TIMEOUT) from None
            finally:
                fake.waiting.clear()
            if isinstance(item, int):
                raise NVMLError(item)
            return item

        def free(event_set):
            fake.event_sets_freed += 1

        m.nvmlEventSetCreate = create
        m.nvmlDeviceGetSupportedEventTypes = supported
        m.nvmlDeviceRegisterEvents = register
        m.nvmlEventSetWait_v2 = wait
        m.nvmlEventSetWait = wait
        m.nvmlEventSetFree = free

    def _readings_module(self, m: types.ModuleType) -> None:
        fake = self

        def optional(name, index, fn):
            fake.calls.append(f"{name}:{index}")
            fake._symbol(name)
            if name in fake.devices[index].unsupported:
                raise NVMLError(NOT_SUPPORTED)
            return fn(fake.devices[index])

        m.nvmlDeviceGetPowerUsage = lambda h: optional("nvmlDeviceGetPowerUsage", h, lambda d: d.power_mw)
        m.nvmlDeviceGetEnforcedPowerLimit = lambda h: optional(
            "nvmlDeviceGetEnforcedPowerLimit", h, lambda d: d.power_limit_mw
        )
        m.nvmlDeviceGetClockInfo = lambda h, kind: optional("nvmlDeviceGetClockInfo", h, lambda d: d.sm_clock)
        m.nvmlDeviceGetMaxClockInfo = lambda h, kind: optional("nvmlDeviceGetMaxClockInfo", h, lambda d: d.sm_clock_max)

        def samples(h, kind, last):
            fake.sample_asks.append((h, kind, last))

            def read(d):
                if kind not in d.samples:
                    raise NVMLError(NOT_SUPPORTED)
                fresh = [
                    types.SimpleNamespace(timeStamp=t, sampleValue=_value(d.sample_value_type, v))
                    for t, v in d.samples[kind]
                    if t > last
                ]
                if not fresh:
                    raise NVMLError(NOT_FOUND)  # what the driver answers when nothing is newer
                return d.sample_value_type, fresh

            return optional("nvmlDeviceGetSamples", h, read)

        m.nvmlDeviceGetSamples = samples

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
            "util", h, lambda d: types.SimpleNamespace(gpu=d.util, memory=d.memory_util)
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


def _value(value_type: int, v: float) -> types.SimpleNamespace:
    """An nvmlValue_t union: every member reads something; only the one of `value_type` is right."""
    names = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
    garbage = dict.fromkeys(names, -1)
    if 0 <= value_type < len(names):
        garbage[names[value_type]] = v
    return types.SimpleNamespace(**garbage)
