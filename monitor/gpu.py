"""NVML: what the GPUs are really doing. The only module that touches `pynvml`.

`pynvml` comes from NVIDIA's own `nvidia-ml-py` package (the `pynvml` distribution on PyPI is
a deprecated third-party copy). Every failure mode ends as "not available", never as an error
in a pass: no library, no driver, a driver/library mismatch after an upgrade (until reboot),
a call a GPU does not support, and the process-list symbol that an older driver lacks (which
raises NVMLLibraryMismatchError, not an NVMLError: we fall back to the _v2 call).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import os
import pwd
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from monitor import protocol
from monitor.logs import get_logger

log = get_logger("gpulock_monitor.nvml")

# Xid errors kept per device, and shown in an audit record's `gpu`.
XID_KEPT = 256
XID_SHOWN = 16
# How long the Xid thread waits for an event at a time: how soon it stops when asked.
XID_WAIT_MS = 500

# nvml.h values, stable across drivers (a binding may lack the names, never the numbers).
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_CLOCK_SM = 1
NVML_TOTAL_POWER_SAMPLES = 0
NVML_GPU_UTILIZATION_SAMPLES = 1
NVML_MEMORY_UTILIZATION_SAMPLES = 2
NVML_EVENT_TYPE_XID_CRITICAL_ERROR = 0x8
# Not a MIG instance (nvmlEventData_t's gpuInstanceId/computeInstanceId outside MIG mode).
NVML_NO_INSTANCE = 0xFFFFFFFF
# nvmlValueType_t -> the nvmlValue_t member that holds a sample.
_SAMPLE_FIELDS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
# Answers meaning "this call will never work here": remembered per device, the call not made again.
_NEVER = (NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND)

# NVML return codes (nvml.h) behind the init failures an operator will meet.
_INIT_REASONS = {
    9: "NVIDIA driver not loaded",
    12: "no NVIDIA driver on this host (libnvidia-ml not found)",
    18: "NVIDIA driver and library versions differ (a driver upgrade without a reboot?)",
}


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None
    name: str | None
    user: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "used_bytes": self.used_bytes, "name": self.name, "user": self.user}


@dataclass(frozen=True)
class Sample:
    """One value from the driver's own sample buffer, timed on this host's monotonic clock."""

    mono: float
    value: float


@dataclass(frozen=True)
class Xid:
    """One Xid error NVML reported for a device (`code`: the Xid number, as in the kernel log)."""

    code: int
    wall: float  # time.time() when the monitor received it
    mono: float  # time.monotonic() then: what durations and "since the holding began" use
    gpu_instance: int | None = None  # MIG: the GPU/compute instance the error was in, when NVML says
    compute_instance: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "ts": datetime.fromtimestamp(self.wall, timezone.utc).isoformat(timespec="milliseconds"),
            "gpu_instance": self.gpu_instance,
            "compute_instance": self.compute_instance,
        }


@dataclass(frozen=True)
class GpuInfo:
    """One device at one moment; None means NVML could not say.

    The `*_samples` are what the driver sampled since the previous snapshot (every sample, not one
    a pass): () when it sampled nothing new (an idle GPU's buffer runs dry), None when this
    driver or GPU has no sample buffer of that kind. `xids` are the Xid errors received since the
    monitor started watching (the most recent XID_KEPT), None when Xid events are not watched or
    not available on this device. `read_mono` is when this snapshot was read (time.monotonic()).
    """

    index: int
    uuid: str | None
    name: str | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization_pct: int | None
    processes: tuple[GpuProcess, ...] | None
    memory_util_pct: int | None = None  # memory-controller activity (utilization.memory)
    power_w: float | None = None
    power_limit_w: float | None = None  # the enforced limit
    sm_clock_mhz: int | None = None
    sm_clock_max_mhz: int | None = None
    util_samples: tuple[Sample, ...] | None = None
    memory_util_samples: tuple[Sample, ...] | None = None
    power_samples: tuple[Sample, ...] | None = None  # watts
    xids: tuple[Xid, ...] | None = None
    read_mono: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_used_bytes": self.memory_used_bytes,
            "memory_total_bytes": self.memory_total_bytes,
            "utilization_pct": self.utilization_pct,
            "processes": None if self.processes is None else [p.as_dict() for p in self.processes],
            "memory_util_pct": self.memory_util_pct,
            "power_w": self.power_w,
            "power_limit_w": self.power_limit_w,
            "sm_clock_mhz": self.sm_clock_mhz,
            "sm_clock_max_mhz": self.sm_clock_max_mhz,
            "xids": None if self.xids is None else [x.as_dict() for x in self.xids[-XID_SHOWN:]],
        }


class Nvml:
    """Lazy, thread-safe access to NVML; `snapshot()` is {} whenever NVML is unavailable."""

    def __init__(
        self,
        mode: str = "auto",
        load: Callable[[], ModuleType] | None = None,
        *,
        xid_events: bool = False,
        xid_wait_ms: int = XID_WAIT_MS,
    ) -> None:
        self.mode = mode
        self._load = load or (lambda: importlib.import_module("pynvml"))
        self._lock = threading.Lock()
        self._nv: Any = None
        self._tried = False
        self._use_v2_processes = False
        self.reason: str | None = None  # why NVML is unavailable
        self._xid_events = xid_events
        self._xid_wait_ms = xid_wait_ms
        self.xids: XidWatch | None = None
        self._never: set[tuple[int, str]] = set()  # (device, call) that this driver does not support
        self._last_sample: dict[tuple[int, int], int] = {}  # (device, sample type) -> last timestamp seen

    @property
    def available(self) -> bool:
        self._init()
        return self._nv is not None

    def _init(self) -> None:
        with self._lock:
            if self._tried:
                return
            self._tried = True
            if self.mode == "false":
                self.reason = "disabled in config (nvml.enabled: false)"
                return
            try:
                nv = self._load()
            except ImportError:
                self._unavailable("nvidia-ml-py is not installed")
                return
            try:
                nv.nvmlInit()
            except nv.NVMLError as exc:
                self._unavailable(_INIT_REASONS.get(getattr(exc, "value", -1), f"NVML init failed: {exc}"))
                return
            except OSError as exc:  # a broken libnvidia-ml that cannot even be loaded
                self._unavailable(f"NVML could not be loaded: {exc}")
                return
            self._nv = nv
            atexit.register(self.shutdown)
            log.info("nvml_ready", devices=self._count())
            if self._xid_events:
                self.xids = XidWatch(nv, self._count(), self._xid_wait_ms)
                self.xids.start()

    def _unavailable(self, reason: str) -> None:
        self.reason = reason
        # auto: one info line and silence after; true: the operator asked for it, so warn.
        (log.warning if self.mode == "true" else log.info)("nvml_unavailable", reason=reason)

    def shutdown(self) -> None:
        with self._lock:
            if self._nv is not None:
                if self.xids is not None and not self.xids.stop():
                    # Its thread is still inside NVML: shutting NVML down under it could crash.
                    self._nv = None
                    return
                with contextlib.suppress(self._nv.NVMLError):
                    self._nv.nvmlShutdown()
                self._nv = None

    def _count(self) -> int:
        try:
            return int(self._nv.nvmlDeviceGetCount())
        except self._nv.NVMLError:
            return 0

    def snapshot(self) -> dict[int, GpuInfo]:
        """Every local device, one NVML query round per device."""
        if not self.available:
            return {}
        with self._lock:
            if self._nv is None:  # shut down meanwhile
                return {}
            return {i: self._device(i) for i in range(self._count())}

    def _device(self, index: int) -> GpuInfo:
        nv = self._nv
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
        except nv.NVMLError:
            return GpuInfo(index, None, None, None, None, None, None)
        memory = self._call(nv.nvmlDeviceGetMemoryInfo, handle)
        utilization = self._call(nv.nvmlDeviceGetUtilizationRates, handle)
        uuid = _text(self._call(nv.nvmlDeviceGetUUID, handle))
        power_mw = self._optional(index, "nvmlDeviceGetPowerUsage", handle)
        limit_mw = self._optional(index, "nvmlDeviceGetEnforcedPowerLimit", handle)
        return GpuInfo(
            index=index,
            uuid=uuid,
            name=_text(self._call(nv.nvmlDeviceGetName, handle)),
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            utilization_pct=None if utilization is None else int(utilization.gpu),
            processes=self._processes(handle),
            memory_util_pct=None if utilization is None else int(utilization.memory),
            power_w=None if power_mw is None else int(power_mw) / 1000,
            power_limit_w=None if limit_mw is None else int(limit_mw) / 1000,
            sm_clock_mhz=_int(self._optional(index, "nvmlDeviceGetClockInfo", handle, NVML_CLOCK_SM)),
            sm_clock_max_mhz=_int(self._optional(index, "nvmlDeviceGetMaxClockInfo", handle, NVML_CLOCK_SM)),
            util_samples=self._samples(index, handle, NVML_GPU_UTILIZATION_SAMPLES),
            memory_util_samples=self._samples(index, handle, NVML_MEMORY_UTILIZATION_SAMPLES),
            power_samples=self._samples(index, handle, NVML_TOTAL_POWER_SAMPLES, scale=1 / 1000),
            xids=None if self.xids is None else self.xids.of(uuid),
            read_mono=time.monotonic(),
        )

    def _optional(self, index: int, name: str, *args: Any) -> Any:
        """A call that a GPU, a driver or the binding may not have: None then, and not asked again
        (an old binding lacks the function; an old driver the symbol: FUNCTION_NOT_FOUND)."""
        if (index, name) in self._never:
            return None
        fn = getattr(self._nv, name, None)
        try:
            if fn is None:
                raise self._nv.NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
            return fn(*args)
        except self._nv.NVMLError as exc:
            if getattr(exc, "value", None) in _NEVER:
                self._never.add((index, name))
            return None

    def _samples(self, index: int, handle: Any, kind: int, scale: float = 1.0) -> tuple[Sample, ...] | None:
        """What the driver sampled since the last call (its buffer: every sample, not one a pass)."""
        name = f"nvmlDeviceGetSamples:{kind}"
        if (index, name) in self._never:
            return None
        fn = getattr(self._nv, "nvmlDeviceGetSamples", None)
        last = self._last_sample.get((index, kind), 0)
        try:
            if fn is None:
                raise self._nv.NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
            value_type, raw = fn(handle, kind, last)
        except self._nv.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code == NVML_ERROR_NOT_FOUND:
                return ()  # nothing sampled since (an idle GPU's buffer runs dry)
            if code in _NEVER:
                self._never.add((index, name))
            return None
        member = _SAMPLE_FIELDS.get(int(value_type))
        if member is None:
            return None
        fresh = [(int(s.timeStamp), getattr(s.sampleValue, member)) for s in raw if int(s.timeStamp) > last]
        if not fresh:
            return ()
        newest = max(t for t, _ in fresh)
        self._last_sample[(index, kind)] = newest
        to_mono = _sample_clock(newest)
        return tuple(Sample(to_mono(t), float(v) * scale) for t, v in sorted(fresh))

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._nv.NVMLError:
            return None

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...] | None:
        nv = self._nv
        raw = None
        if not self._use_v2_processes:
            try:
                raw = nv.nvmlDeviceGetComputeRunningProcesses(handle)
            except nv.NVMLLibraryMismatchError:
                # The driver predates the _v3 symbol this binding calls by default.
                self._use_v2_processes = True
            except nv.NVMLError:
                return None
        if self._use_v2_processes:
            raw = self._call(nv.nvmlDeviceGetComputeRunningProcesses_v2, handle)
            if raw is None:
                return None
        return tuple(
            GpuProcess(
                pid=int(p.pid),
                used_bytes=None if p.usedGpuMemory is None else int(p.usedGpuMemory),
                name=self._process_name(int(p.pid)),
                user=_process_user(int(p.pid)),
            )
            for p in raw or ()
        )

    def _process_name(self, pid: int) -> str | None:
        name = _text(self._call(self._nv.nvmlSystemGetProcessName, pid))
        if name:
            return name
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip() or None
        except OSError:  # another user's process under ProtectProc=invisible, or gone
            return None


class XidWatch:
    """Xid errors from an NVML event set, read by a daemon thread, kept per GPU UUID.

    Where the event set cannot be made or no device accepts the Xid event type (some GPUs, old
    drivers, containers: NOT_SUPPORTED), `reason` says so and `of()` is None: Xid is "not
    available", never an error. Only Xids that happen while it watches are seen.
    """

    retry_s = 1.0  # after a failed wait (not a timeout): no busy loop while the driver keeps failing

    def __init__(self, nv: Any, count: int, wait_ms: int = XID_WAIT_MS) -> None:
        self._nv = nv
        self._count = count
        self.wait_ms = wait_ms
        self._set: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._kept: dict[str, deque[Xid]] = {}  # the UUIDs registered, each with its Xids
        self._uuids: dict[int | None, str | None] = {}  # a registered device's handle (its address) -> UUID
        self.reason: str | None = None  # why Xids are not available, where they are not
        self.errors = 0  # waits that failed with something other than a timeout

    def start(self) -> bool:
        """Register every device that takes Xid events and start the thread; False when none does."""
        nv = self._nv
        try:
            self._set = nv.nvmlEventSetCreate()
        except (nv.NVMLError, AttributeError) as exc:
            return self._none(f"xid: not available (no event set: {exc})")
        for index in range(self._count):
            uuid = self._register(index)
            if uuid is not None:
                self._kept[uuid] = deque(maxlen=XID_KEPT)
        if not self._kept:
            self._free()
            return self._none("xid: not available (no device takes Xid events)")
        self._thread = threading.Thread(target=self._run, name="nvml-xid", daemon=True)
        self._thread.start()
        log.info("nvml_xid_watch", devices=sorted(self._kept))
        return True

    def _none(self, reason: str) -> bool:
        self.reason = reason
        log.info("nvml_xid_unavailable", reason=reason)
        return False

    def _register(self, index: int) -> str | None:
        nv = self._nv
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nv.nvmlDeviceGetUUID(handle))
            supported = getattr(nv, "nvmlDeviceGetSupportedEventTypes", None)
            if supported is not None and not int(supported(handle)) & NVML_EVENT_TYPE_XID_CRITICAL_ERROR:
                return None
            nv.nvmlDeviceRegisterEvents(handle, NVML_EVENT_TYPE_XID_CRITICAL_ERROR, self._set)
        except nv.NVMLError:
            return None
        self._uuids[_address(handle)] = uuid
        return uuid

    def of(self, uuid: str | None) -> tuple[Xid, ...] | None:
        """The Xids of one GPU (oldest first), or None when that GPU's Xids are not watched."""
        with self._lock:
            kept = self._kept.get(uuid) if uuid is not None else None
            return None if kept is None else tuple(kept)

    def _wait(self) -> Any:
        nv = self._nv
        wait = getattr(nv, "nvmlEventSetWait_v2", None) or nv.nvmlEventSetWait
        return wait(self._set, self.wait_ms)

    def _run(self) -> None:
        nv = self._nv
        while not self._stop.is_set():
            try:
                data = self._wait()
            except nv.NVMLError as exc:
                if getattr(exc, "value", None) != NVML_ERROR_TIMEOUT:
                    self.errors += 1
                    if self.errors == 1:
                        log.warning("nvml_xid_wait_failed", error=str(exc))
                    self._stop.wait(self.retry_s)
                continue
            except Exception:  # a driver's surprise must not end the thread while Xids read as watched
                self.errors += 1
                log.exception("nvml_xid_wait_failed")
                self._stop.wait(self.retry_s)
                continue
            try:
                if not int(data.eventType) & NVML_EVENT_TYPE_XID_CRITICAL_ERROR:
                    continue
                # By the handle registered: a GPU that fell off the bus (Xid 79) may not say its UUID now.
                self._keep(self._uuids.get(_address(data.device)), data)
            except Exception:  # an event of a shape this binding did not promise
                self.errors += 1
                log.exception("nvml_xid_event_unreadable")

    def _keep(self, uuid: str | None, data: Any) -> None:
        xid = Xid(
            code=int(data.eventData),
            wall=time.time(),
            mono=time.monotonic(),
            gpu_instance=_instance(getattr(data, "gpuInstanceId", None)),
            compute_instance=_instance(getattr(data, "computeInstanceId", None)),
        )
        with self._lock:
            kept = self._kept.get(uuid) if uuid is not None else None
            if kept is not None:
                kept.append(xid)
        log.warning("nvml_xid", uuid=uuid, code=xid.code)

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop the thread and free the event set; False when the thread would not stop (then the
        set is left alone: freeing it under a wait is undefined)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.wait_ms / 1000 + 5 if timeout_s is None else timeout_s)
            if self._thread.is_alive():
                return False
        self._free()
        return True

    def _free(self) -> None:
        if self._set is not None:
            with contextlib.suppress(self._nv.NVMLError):
                self._nv.nvmlEventSetFree(self._set)
            self._set = None


def _address(handle: Any) -> int | None:
    """What identifies a device handle: the address an nvmlDevice_t pointer holds (the binding hands
    out a new pointer object for the same device)."""
    return ctypes.cast(handle, ctypes.c_void_p).value


def _instance(value: Any) -> int | None:
    return None if value is None or int(value) == NVML_NO_INSTANCE else int(value)


def _now_clocks() -> tuple[float, tuple[float, ...]]:
    """time.monotonic(), and the clocks a driver may stamp its samples with: the Unix epoch (as
    NVML documents), boot time and monotonic time (what Linux drivers have been seen to use)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
    return time.monotonic(), (time.time(), time.clock_gettime(boottime), time.monotonic())


def _sample_clock(newest_us: int) -> Callable[[int], float]:
    """Turns sample timestamps (microseconds, on a clock NVML leaves unspecified) into this host's
    monotonic time: the clock is the one whose "now" is at or just after the newest sample. When
    none is, the newest sample is taken as now (its spacing is still right)."""
    mono, clocks = _now_clocks()
    newest = newest_us / 1e6
    behind = [now - newest for now in clocks if now >= newest]
    offset = min(behind) if behind else 0.0
    return lambda t_us: mono - offset - (newest - t_us / 1e6)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _process_user(pid: int) -> str | None:
    try:
        return pwd.getpwuid(Path(f"/proc/{pid}").stat().st_uid).pw_name
    except (OSError, KeyError):
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# Label names of the per-GPU metrics: dcgm-exporter's, so that PromQL can join its series and ours.
METRIC_LABELS = ("gpu", "UUID", "modelName", "Hostname")


def node_name() -> str:
    """The host name dcgm-exporter puts in `Hostname`: `$NODE_NAME` when set (on Kubernetes, the
    node's name from the downward API; a pod's own host name changes with every restart), else
    this host's name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


def metric_labels(info: GpuInfo, hostname: str) -> list[str]:
    """The values of METRIC_LABELS for one device ("" where NVML could not say)."""
    return [str(info.index), info.uuid or "", info.name or "", hostname]


def device_for(lock_key: bytes, devices: Mapping[str, int | str], gpus: Mapping[int, GpuInfo]) -> GpuInfo | None:
    """The local device a lock guards, or None when it guards no GPU of this host.

    With `nvml.devices` set, only the locks it names are local (by index or UUID). Without it,
    `<anything>:<n>` means local device n when this host has one.
    """
    if devices:
        target = devices.get(protocol.text(lock_key))
        if target is None:
            return None
        if isinstance(target, int):
            return gpus.get(target)
        return next((g for g in gpus.values() if g.uuid == target), None)
    suffix = lock_key.rsplit(b":", 1)[-1]
    return gpus.get(int(suffix)) if suffix.isdigit() else None
