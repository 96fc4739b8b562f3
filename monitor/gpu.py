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
import importlib
import os
import pwd
import socket
import threading
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

    def __init__(self, mode: str = "auto", load: Callable[[], ModuleType] | None = None) -> None:
        self.mode = mode
        self._load = load or (lambda: importlib.import_module("pynvml"))
        self._lock = threading.Lock()
        self._nv: Any = None
        self._tried = False
        self._use_v2_processes = False
        self.reason: str | None = None  # why NVML is unavailable

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

    def _unavailable(self, reason: str) -> None:
        self.reason = reason
        # auto: one info line and silence after; true: the operator asked for it, so warn.
        (log.warning if self.mode == "true" else log.info)("nvml_unavailable", reason=reason)

    def shutdown(self) -> None:
        with self._lock:
            if self._nv is not None:
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
        return GpuInfo(
            index=index,
            uuid=_text(self._call(nv.nvmlDeviceGetUUID, handle)),
            name=_text(self._call(nv.nvmlDeviceGetName, handle)),
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            utilization_pct=None if utilization is None else int(utilization.gpu),
            processes=self._processes(handle),
        )

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
