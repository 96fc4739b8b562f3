"""GPU awareness: the real no-driver path on this machine, the logic against a fake pynvml,
and a real-GPU check that runs only where a driver is present."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from fake_pynvml import (
    DRIVER_NOT_LOADED,
    GPU_UTILIZATION_SAMPLES,
    LIB_RM_VERSION_MISMATCH,
    LIBRARY_NOT_FOUND,
    MEMORY_UTILIZATION_SAMPLES,
    NOT_SUPPORTED,
    TOTAL_POWER_SAMPLES,
    UNKNOWN,
    Device,
    FakeNvml,
)
from helpers import beat, build, config_file, events, hold, make_settings, wait_for

from monitor import gpu, logs, snapshot
from monitor.cli import main
from monitor.cli import status as report
from monitor.gpu import GpuInfo, Nvml, device_for
from monitor.gpuwatch import GpuWatch

GIB = 1 << 30
# The optional per-device readings, by the NVML call that gives each.
READINGS = (
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetMaxClockInfo",
)


def nvml_of(fake: FakeNvml, mode: str = "auto") -> Nvml:
    return Nvml(mode, load=lambda: fake.module)


# --- NVML itself ------------------------------------------------------------------------------------


def test_snapshot_reads_every_device_once():
    fake = FakeNvml([Device("GPU-aaa", processes=[(os.getpid(), 2 * GIB)]), Device("GPU-bbb", util=0)])
    nvml = nvml_of(fake)
    gpus = nvml.snapshot()
    assert sorted(gpus) == [0, 1]
    g0 = gpus[0]
    assert (g0.uuid, g0.name, g0.memory_used_bytes, g0.memory_total_bytes, g0.utilization_pct) == (
        "GPU-aaa", "NVIDIA H100 80GB HBM3", GIB, 80 * GIB, 37
    )  # fmt: skip
    (proc,) = g0.processes
    assert (proc.pid, proc.used_bytes) == (os.getpid(), 2 * GIB)
    assert proc.name == Path(f"/proc/{os.getpid()}/comm").read_text().strip()  # NVML refused; /proc told
    assert proc.user  # from /proc/<pid> ownership
    assert gpus[1].processes == ()
    asked = ("uuid", "name", "memory", "util", "processes", *READINGS, "nvmlDeviceGetSamples")
    assert sorted(c for c in fake.calls if c != "init") == sorted(
        f"{what}:{i}" for i in (0, 1) for what in asked for _ in range(3 if what == "nvmlDeviceGetSamples" else 1)
    )
    assert fake.calls.count("init") == 1
    nvml.snapshot()
    assert fake.calls.count("init") == 1  # initialised once, lazily


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (LIBRARY_NOT_FOUND, "no NVIDIA driver on this host (libnvidia-ml not found)"),
        (DRIVER_NOT_LOADED, "NVIDIA driver not loaded"),
        (LIB_RM_VERSION_MISMATCH, "NVIDIA driver and library versions differ (a driver upgrade without a reboot?)"),
        (999, "NVML init failed: NVML error 999"),
    ],
)
def test_init_failures_are_one_info_line_then_silence(code, reason, capsys):
    logs.configure("info", "json", stream=sys.stdout)
    fake = FakeNvml([Device("GPU-a")], init_error=code)
    nvml = nvml_of(fake)
    for _ in range(5):
        assert nvml.snapshot() == {}
    assert nvml.reason == reason
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["event"], x["level"]) for x in lines] == [("nvml_unavailable", "info")]
    assert fake.calls == ["init"]


def test_enabled_true_warns_when_unavailable(capsys):
    logs.configure("info", "json", stream=sys.stdout)
    nvml_of(FakeNvml([], init_error=LIBRARY_NOT_FOUND), mode="true").snapshot()
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["level"] == "warning"


def test_disabled_never_loads_the_library():
    def load():
        raise AssertionError("must not import pynvml")

    nvml = Nvml("false", load=load)
    assert nvml.snapshot() == {}
    assert nvml.reason == "disabled in config (nvml.enabled: false)"


def test_missing_nvml_binding_is_unavailable_saying_what_to_install():
    def load():
        raise ImportError("No module named 'pynvml'")

    nvml = Nvml("auto", load=load)
    assert not nvml.available
    assert nvml.reason == "nvidia-ml-py is not installed"


def test_per_call_errors_become_not_available():
    fake = FakeNvml([Device("GPU-a", unsupported={"util", "processes", "memory"})])
    (g,) = nvml_of(fake).snapshot().values()
    assert (g.uuid, g.utilization_pct, g.memory_used_bytes, g.processes) == ("GPU-a", None, None, None)


def test_old_driver_falls_back_to_v2_process_call():
    fake = FakeNvml([Device("GPU-a", processes=[(1, None)])], old_driver=True)
    nvml = nvml_of(fake)
    assert [p.pid for p in nvml.snapshot()[0].processes] == [1]
    assert nvml.snapshot()[0].processes[0].used_bytes is None


def test_broken_library_is_unavailable_not_an_error():
    nvml = nvml_of(FakeNvml([Device("GPU-a")], init_error=OSError("libnvidia-ml.so.1: invalid ELF header")))
    assert nvml.snapshot() == {}
    assert nvml.reason == "NVML could not be loaded: libnvidia-ml.so.1: invalid ELF header"


def test_lost_gpu_has_no_readings_and_a_failing_device_count_gives_no_gpus():
    fake = FakeNvml([Device("GPU-a", lost=True), Device("GPU-b")])
    gpus = nvml_of(fake).snapshot()
    assert gpus[0] == GpuInfo(0, None, None, None, None, None, None)
    assert gpus[1].uuid == "GPU-b"
    fake.count_fails = True
    assert nvml_of(fake).snapshot() == {}


def test_old_driver_without_process_support_lists_no_processes():
    fake = FakeNvml([Device("GPU-a", unsupported={"processes"})], old_driver=True)
    assert nvml_of(fake).snapshot()[0].processes is None


def test_process_name_comes_from_nvml_else_from_proc():
    me = os.getpid()
    fake = FakeNvml([Device("GPU-a", processes=[(me, GIB), (4242, GIB)], process_names={4242: "/usr/bin/python3"})])
    named = {p.pid: p.name for p in nvml_of(fake).snapshot()[0].processes}
    assert named[4242] == "/usr/bin/python3"
    assert named[me] == Path(f"/proc/{me}/comm").read_text().strip()  # NVML would not say: from /proc


def test_shutdown_happens_once_and_later_snapshots_are_empty():
    fake = FakeNvml([Device("GPU-a")])
    nvml = nvml_of(fake)
    assert nvml.available
    nvml.shutdown()
    nvml.shutdown()
    assert fake.shutdowns == 1
    assert nvml.snapshot() == {}


# --- hang evidence: power, clocks, memory activity, driver samples, Xid errors ---------------------


def test_snapshot_reads_power_clocks_and_memory_activity():
    fake = FakeNvml([Device("GPU-a", memory_util=23, power_mw=81_500, power_limit_mw=700_000, sm_clock=345)])
    (g,) = nvml_of(fake).snapshot().values()
    assert (g.memory_util_pct, g.power_w, g.power_limit_w, g.sm_clock_mhz, g.sm_clock_max_mhz) == (
        23, 81.5, 700.0, 345, 1980
    )  # fmt: skip
    assert g.read_mono is not None
    assert abs(g.read_mono - time.monotonic()) < 5
    doc = g.as_dict()
    assert (doc["memory_util_pct"], doc["power_w"], doc["power_limit_w"], doc["sm_clock_mhz"]) == (23, 81.5, 700.0, 345)
    assert doc["xids"] is None  # not watched
    json.dumps(doc)


FIELD_OF = {
    "nvmlDeviceGetPowerUsage": "power_w",
    "nvmlDeviceGetEnforcedPowerLimit": "power_limit_w",
    "nvmlDeviceGetClockInfo": "sm_clock_mhz",
    "nvmlDeviceGetMaxClockInfo": "sm_clock_max_mhz",
}


@pytest.mark.parametrize("how", ["absent", "no_symbol", "not_supported"])
@pytest.mark.parametrize("call", READINGS)
def test_each_reading_missing_on_an_old_driver_is_none_and_not_asked_again(call, how):
    """absent: a binding older than the call; no_symbol: a driver older than the binding
    (FUNCTION_NOT_FOUND); not_supported: this GPU cannot say. The rest is read all the same."""
    device = Device("GPU-a", unsupported={call} if how == "not_supported" else set())
    fake = FakeNvml(
        [device],
        absent=frozenset({call}) if how == "absent" else frozenset(),
        no_symbol=frozenset({call}) if how == "no_symbol" else frozenset(),
    )
    nvml = nvml_of(fake)
    g = nvml.snapshot()[0]
    assert getattr(g, FIELD_OF[call]) is None
    others = {f for c, f in FIELD_OF.items() if c != call}
    assert all(getattr(g, f) is not None for f in others)
    assert (g.uuid, g.utilization_pct, g.memory_util_pct) == ("GPU-a", 37, 12)
    asked = fake.calls.count(f"{call}:0")
    nvml.snapshot()
    assert fake.calls.count(f"{call}:0") == asked  # the driver said never: not asked every pass
    assert fake.calls.count("nvmlDeviceGetPowerUsage:0" if call != "nvmlDeviceGetPowerUsage" else "uuid:0") == 2


def test_a_transient_reading_error_is_none_this_pass_and_asked_again():
    fake = FakeNvml([Device("GPU-a")])
    nvml = nvml_of(fake)
    fake.module.nvmlDeviceGetPowerUsage = lambda h: (_ for _ in ()).throw(fake.module.NVMLError(UNKNOWN))
    assert nvml.snapshot()[0].power_w is None
    fake.module.nvmlDeviceGetPowerUsage = lambda h: 90_000
    assert nvml.snapshot()[0].power_w == 90.0


@pytest.fixture
def clocks(monkeypatch):
    """This host's clocks as the sample conversion reads them: (monotonic, (epoch, boottime, monotonic))."""
    now = {"mono": 5_000.0, "epoch": 1_800_000_000.0, "boot": 7_000.0}

    def read():
        return now["mono"], (now["epoch"], now["boot"], now["mono"])

    monkeypatch.setattr(gpu, "_now_clocks", read)
    return now


@pytest.mark.parametrize("domain", ["epoch", "boot", "mono"])
def test_samples_on_any_driver_clock_come_out_on_this_hosts_monotonic_clock(clocks, domain):
    """NVML documents a CPU timestamp in microseconds; Linux drivers have been seen stamping boot
    time. Whatever the clock, a sample 3 s before now is 3 s before time.monotonic()'s now."""
    base = clocks[domain]
    us = [int((base - 3.0) * 1e6), int((base - 1.5) * 1e6)]
    fake = FakeNvml([Device("GPU-a", samples={GPU_UTILIZATION_SAMPLES: [(us[0], 100), (us[1], 0)]})])
    g = nvml_of(fake).snapshot()[0]
    assert [(round(s.mono, 3), s.value) for s in g.util_samples] == [(4997.0, 100.0), (4998.5, 0.0)]


def test_timestamps_after_every_clock_take_the_newest_sample_as_now(clocks):
    future = int(2_000_000_000 * 1e6)
    fake = FakeNvml([Device("GPU-a", samples={GPU_UTILIZATION_SAMPLES: [(future - 2_000_000, 5), (future, 6)]})])
    g = nvml_of(fake).snapshot()[0]
    assert [(s.mono, s.value) for s in g.util_samples] == [(4998.0, 5.0), (5000.0, 6.0)]


def test_samples_are_read_since_the_last_one_seen_and_none_new_is_empty_not_unavailable(clocks):
    t0 = int(clocks["epoch"] * 1e6)
    device = Device(
        "GPU-a",
        samples={
            GPU_UTILIZATION_SAMPLES: [(t0 - 2_000_000, 97), (t0 - 1_000_000, 98)],
            MEMORY_UTILIZATION_SAMPLES: [(t0 - 1_000_000, 0)],
            TOTAL_POWER_SAMPLES: [(t0 - 1_000_000, 81_000)],
        },
    )
    fake = FakeNvml([device])
    nvml = nvml_of(fake)
    g = nvml.snapshot()[0]
    assert [s.value for s in g.util_samples] == [97, 98]
    assert [s.value for s in g.memory_util_samples] == [0]
    assert [s.value for s in g.power_samples] == [81.0]  # milliwatts become watts
    assert fake.sample_asks == [(0, GPU_UTILIZATION_SAMPLES, 0), (0, MEMORY_UTILIZATION_SAMPLES, 0), (0, 0, 0)]
    # Nothing new: the driver answers NOT_FOUND (an idle GPU's buffer runs dry): () and not None.
    g = nvml.snapshot()[0]
    assert (g.util_samples, g.memory_util_samples, g.power_samples) == ((), (), ())
    assert fake.sample_asks[3] == (0, GPU_UTILIZATION_SAMPLES, t0 - 1_000_000)
    # New samples, and a driver that hands back one it gave before: only the new one comes out.
    clocks["epoch"] += 10
    clocks["mono"] += 10
    device.samples[GPU_UTILIZATION_SAMPLES] += [(t0 + 9_000_000, 3)]
    fake.module.nvmlDeviceGetSamples = lambda h, kind, last: (
        1,
        [_sample(t0 - 1_000_000, 98), _sample(t0 + 9_000_000, 3)],
    )
    g = nvml.snapshot()[0]
    assert [(s.mono, s.value) for s in g.util_samples] == [(5009.0, 3.0)]


def test_samples_on_this_hosts_real_clocks():
    now_us = int(time.time() * 1e6)
    fake = FakeNvml([Device("GPU-a", samples={GPU_UTILIZATION_SAMPLES: [(now_us - 2_000_000, 1), (now_us, 2)]})])
    g = nvml_of(fake).snapshot()[0]
    old, new = (time.monotonic() - s.mono for s in g.util_samples)
    assert 0 <= new < 1
    assert abs(old - new - 2) < 0.001


def test_a_driver_handing_back_only_samples_seen_before_gives_none_new(clocks):
    t = int(clocks["epoch"] * 1e6)
    fake = FakeNvml([Device("GPU-a", samples={GPU_UTILIZATION_SAMPLES: [(t, 7)]})])
    nvml = nvml_of(fake)
    assert [s.value for s in nvml.snapshot()[0].util_samples] == [7]
    fake.module.nvmlDeviceGetSamples = lambda h, kind, last: (1, [_sample(t, 7)])
    assert nvml.snapshot()[0].util_samples == ()


def _sample(ts: int, value: float):
    import types

    return types.SimpleNamespace(timeStamp=ts, sampleValue=types.SimpleNamespace(uiVal=value, dVal=-1.0))


@pytest.mark.parametrize(("value_type", "expect"), [(0, [42.5]), (1, [42.5]), (5, [42.5]), (99, None)])
def test_sample_values_are_read_from_the_member_the_value_type_names(clocks, value_type, expect):
    t = int(clocks["epoch"] * 1e6)
    fake = FakeNvml([Device("GPU-a", samples={GPU_UTILIZATION_SAMPLES: [(t, 42.5)]}, sample_value_type=value_type)])
    g = nvml_of(fake).snapshot()[0]
    assert (None if g.util_samples is None else [s.value for s in g.util_samples]) == expect


@pytest.mark.parametrize("how", ["absent", "no_symbol", "not_supported", "kind_not_supported"])
def test_samples_missing_on_an_old_driver_are_none_and_not_asked_again(how):
    device = Device("GPU-a", samples={} if how == "kind_not_supported" else {GPU_UTILIZATION_SAMPLES: [(1, 1)]})
    if how == "not_supported":
        device.unsupported.add("nvmlDeviceGetSamples")
    fake = FakeNvml(
        [device],
        absent=frozenset({"nvmlDeviceGetSamples"}) if how == "absent" else frozenset(),
        no_symbol=frozenset({"nvmlDeviceGetSamples"}) if how == "no_symbol" else frozenset(),
    )
    nvml = nvml_of(fake)
    for _ in range(2):
        g = nvml.snapshot()[0]
        assert (g.util_samples, g.memory_util_samples, g.power_samples) == (None, None, None)
        assert (g.utilization_pct, g.power_w) == (37, 250.0)  # the per-pass readings still come
    assert fake.calls.count("nvmlDeviceGetSamples:0") == (0 if how == "absent" else 3)


def test_a_transient_sample_error_is_none_this_pass_and_asked_again(clocks):
    t = int(clocks["epoch"] * 1e6)
    fake = FakeNvml([Device("GPU-a", samples={GPU_UTILIZATION_SAMPLES: [(t, 50)]})])
    nvml = nvml_of(fake)
    real = fake.module.nvmlDeviceGetSamples
    fake.module.nvmlDeviceGetSamples = lambda h, kind, last: (_ for _ in ()).throw(fake.module.NVMLError(UNKNOWN))
    assert nvml.snapshot()[0].util_samples is None
    fake.module.nvmlDeviceGetSamples = real
    assert [s.value for s in nvml.snapshot()[0].util_samples] == [50]


@pytest.fixture
def xid_nvml() -> Iterator[tuple[FakeNvml, Nvml]]:
    fake = FakeNvml([Device("GPU-a"), Device("GPU-b"), Device("GPU-c", unsupported={"events"})])
    nvml = Nvml("auto", load=lambda: fake.module, xid_events=True, xid_wait_ms=50)
    yield fake, nvml
    nvml.shutdown()


def test_xid_errors_are_kept_per_gpu_with_their_time_and_mig_instance(xid_nvml):
    fake, nvml = xid_nvml
    assert nvml.available
    assert fake.registered == [0, 1]  # GPU-c: NOT_SUPPORTED, as some GPUs and containers answer
    gpus = nvml.snapshot()
    assert (gpus[0].xids, gpus[1].xids, gpus[2].xids) == ((), (), None)
    before = (time.time(), time.monotonic())
    fake.xid(1, 79)
    fake.xid(1, 13, gi=2, ci=0)
    gpus = wait_for(lambda: (g := nvml.snapshot()) and len(g[1].xids) == 2 and g)
    first, second = gpus[1].xids
    assert (first.code, first.gpu_instance, first.compute_instance) == (79, None, None)
    assert (second.code, second.gpu_instance, second.compute_instance) == (13, 2, 0)
    assert before[0] <= first.wall <= time.time()
    assert before[1] <= first.mono <= second.mono <= time.monotonic()
    assert gpus[0].xids == ()
    doc = gpus[1].as_dict()["xids"]
    assert [x["code"] for x in doc] == [79, 13]
    assert doc[0]["ts"].endswith("+00:00")
    assert nvml.xids is not None
    assert nvml.xids.reason is None


def test_xid_wait_errors_are_logged_once_and_the_watch_goes_on(xid_nvml, capsys, monkeypatch):
    logs.configure("info", "json", stream=sys.stdout)
    monkeypatch.setattr(gpu.XidWatch, "retry_s", 0.01)
    fake, nvml = xid_nvml
    assert nvml.available
    fake.event(UNKNOWN)
    fake.event(UNKNOWN)
    import types

    fake.event(types.SimpleNamespace(device=0, eventType=0x4, eventData=0))  # not an Xid: ignored
    fake.xid(0, 48)
    wait_for(lambda: nvml.snapshot()[0].xids, timeout_s=10)
    assert [x.code for x in nvml.snapshot()[0].xids] == [48]
    assert nvml.xids is not None
    assert nvml.xids.errors == 2
    failed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if "nvml_xid_wait_failed" in x]
    assert len(failed) == 1


def test_an_xid_from_a_gpu_that_no_longer_tells_its_uuid_is_kept_by_its_handle(xid_nvml):
    fake, nvml = xid_nvml
    assert nvml.available
    assert nvml.xids is not None
    fake.devices[1].unsupported.add("uuid")  # fallen off the bus: Xid 79, and no more answers
    fake.xid(1, 79)
    assert [x.code for x in wait_for(lambda: nvml.xids.of("GPU-b"))] == [79]
    assert nvml.snapshot()[1].xids is None  # the snapshot cannot name the GPU: nothing to match


def test_xid_for_a_device_not_watched_is_dropped(xid_nvml):
    fake, nvml = xid_nvml
    assert nvml.available
    fake.xid(2, 31)  # GPU-c did not register: its events should not come, and are kept nowhere
    fake.xid(0, 31)
    wait_for(lambda: nvml.snapshot()[0].xids)
    assert nvml.snapshot()[2].xids is None


def test_shutdown_stops_the_xid_thread_frees_the_event_set_then_nvml(xid_nvml):
    fake, nvml = xid_nvml
    assert nvml.available
    watch = nvml.xids
    assert watch is not None
    wait_for(lambda: fake.waits > 0)
    nvml.shutdown()
    assert watch._thread is not None
    assert not watch._thread.is_alive()
    assert (fake.event_sets_freed, fake.shutdowns) == (1, 1)
    assert nvml.snapshot() == {}


def test_a_thread_that_will_not_stop_keeps_its_event_set_and_nvml_is_not_shut_under_it():
    fake = FakeNvml([Device("GPU-a")])
    release = __import__("threading").Event()

    def stuck(event_set, timeout_ms):
        fake.waiting.set()
        release.wait()
        raise fake.module.NVMLError(10)

    fake.module.nvmlEventSetWait_v2 = stuck
    nvml = Nvml("auto", load=lambda: fake.module, xid_events=True, xid_wait_ms=50)
    assert nvml.available
    watch = nvml.xids
    assert watch is not None
    wait_for(fake.waiting.is_set)
    assert watch.stop(timeout_s=0.05) is False
    assert fake.event_sets_freed == 0
    watch.stop = lambda timeout_s=None: False  # as the real one answers while the wait goes on
    nvml.shutdown()
    assert fake.shutdowns == 0
    assert nvml.snapshot() == {}
    release.set()
    watch._thread.join(timeout=5)


@pytest.mark.parametrize(
    ("fake_kwargs", "devices", "reason"),
    [
        ({"event_set_error": NOT_SUPPORTED}, None, "xid: not available (no event set: NVML error 3)"),
        ({"absent": frozenset({"nvmlEventSetCreate"})}, None, "xid: not available (no event set: "),
        ({"no_symbol": frozenset({"nvmlEventSetCreate"})}, None, "xid: not available (no event set: NVML error 13)"),
        ({"no_symbol": frozenset({"nvmlDeviceRegisterEvents"})}, None, "xid: not available (no device takes"),
        ({}, {"events"}, "xid: not available (no device takes Xid events)"),
        ({}, {"supported_events"}, "xid: not available (no device takes Xid events)"),
        ({}, {"uuid"}, "xid: not available (no device takes Xid events)"),
    ],
)
def test_xid_not_available_is_said_once_and_never_an_error(fake_kwargs, devices, reason, capsys):
    logs.configure("info", "json", stream=sys.stdout)
    fake = FakeNvml([Device("GPU-a", unsupported=set(devices or ()))], **fake_kwargs)
    nvml = Nvml("auto", load=lambda: fake.module, xid_events=True, xid_wait_ms=50)
    g = nvml.snapshot()[0]
    assert g.xids is None
    assert nvml.xids is not None
    assert nvml.xids.reason is not None
    assert nvml.xids.reason.startswith(reason)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["event"] for x in lines if "xid" in x["event"]] == ["nvml_xid_unavailable"]
    nvml.shutdown()
    assert fake.shutdowns == 1


def test_a_device_without_xid_in_its_supported_events_is_not_registered():
    fake = FakeNvml([Device("GPU-a", events=0x4), Device("GPU-b")], absent=frozenset())
    nvml = Nvml("auto", load=lambda: fake.module, xid_events=True, xid_wait_ms=50)
    gpus = nvml.snapshot()
    assert (gpus[0].xids, gpus[1].xids) == (None, ())
    nvml.shutdown()


def test_a_binding_without_supported_event_types_or_wait_v2_still_watches():
    fake = FakeNvml([Device("GPU-a")], absent=frozenset({"nvmlDeviceGetSupportedEventTypes", "nvmlEventSetWait_v2"}))
    nvml = Nvml("auto", load=lambda: fake.module, xid_events=True, xid_wait_ms=50)
    assert nvml.snapshot()[0].xids == ()
    fake.xid(0, 94)
    assert [x.code for x in wait_for(lambda: nvml.snapshot()[0].xids)] == [94]
    nvml.shutdown()


def test_xid_events_are_not_watched_unless_asked_or_when_nvml_is_off():
    fake = FakeNvml([Device("GPU-a")])
    nvml = nvml_of(fake)
    assert nvml.snapshot()[0].xids is None
    assert nvml.xids is None
    assert fake.registered == []
    off = Nvml("false", load=lambda: fake.module, xid_events=True)
    assert off.snapshot() == {}
    assert off.xids is None


# --- which lock guards which GPU ----------------------------------------------------------------


GPUS = {i: GpuInfo(i, f"GPU-{i}", None, None, None, None, ()) for i in range(2)}


@pytest.mark.parametrize(
    ("key", "devices", "index"),
    [
        (b"gpu_lock:0", {}, 0),
        (b"gpu_lock:1", {}, 1),
        (b"gpu_lock:2", {}, None),  # no such local device
        (b"gpu_lock:node7", {}, None),
        (b"gpu_lock:node7-0", {"gpu_lock:node7-0": 1}, 1),
        (b"gpu_lock:x", {"gpu_lock:x": "GPU-0"}, 0),
        (b"gpu_lock:0", {"gpu_lock:x": "GPU-0"}, None),  # an explicit map names the local locks
        (b"gpu_lock:y", {"gpu_lock:y": "GPU-missing"}, None),
    ],
)
def test_lock_key_maps_to_the_local_gpu_of_its_index_or_of_the_explicit_map(key, devices, index):
    info = device_for(key, devices, GPUS)
    assert (info.index if info else None) == index


# --- findings, audit and status with a fake GPU host -----------------------------------------------


def test_gpu_busy_with_no_lock_past_grace_and_busy_after_a_release_are_audited(r, redis_server, tmp_path):
    # A hard cap of 0.3 s: GPU 1's holding, taken after the monitor's complete passes, reaches it
    # in real time (a faked TTL age would rightly be disbelieved).
    settings = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock_monitor={"timeout_levels": {"warning": 0.1, "soft_timeout": 0.2, "hard_timeout": 0.3}},
    )
    fake = FakeNvml([Device("GPU-a", processes=[(4242, GIB)]), Device("GPU-b")])
    clock = [0.0]
    watch = GpuWatch(nvml_of(fake), {}, busy_grace_s=30, mono=lambda: clock[0])
    monitor = build(settings, gpus=watch)
    monitor.run_pass()
    clock[0] = 29
    monitor.run_pass()
    assert events(settings.audit_path, "gpu_busy_unlocked") == []
    clock[0] = 31
    monitor.run_pass()
    monitor.run_pass()
    (busy,) = events(settings.audit_path, "gpu_busy_unlocked")
    assert busy["gpu"]["index"] == 0
    assert busy["gpu"]["processes"][0]["pid"] == 4242
    assert busy["busy_s"] == 31
    # GPU 1: a hung holder past the cap is released, but its process stays on the GPU.
    fake.devices[1].processes = [(777, 3 * GIB)]
    key = hold(r, 1, "hung")
    beat(r, key)  # alive, but hung
    time.sleep(0.35)
    monitor.run_pass()
    (released,) = events(settings.audit_path, "lock_released")
    assert released["reason"] == "hard_timeout"
    assert released["gpu"]["uuid"] == "GPU-b"
    assert released["gpu"]["memory_total_bytes"] == 80 * GIB
    monitor.run_pass()
    (still,) = events(settings.audit_path, "released_gpu_busy")
    assert (still["lock_key"], still["holder"]) == ("gpu_lock:1", "locked_by_hung")
    assert still["gpu"]["processes"][0]["pid"] == 777


def test_busy_gpu_with_its_lock_held_is_fine(r, settings):
    fake = FakeNvml([Device("GPU-a", processes=[(1, GIB)])])
    watch = GpuWatch(nvml_of(fake), {}, busy_grace_s=0)
    hold(r, 0, age_s=301)
    monitor = build(settings, gpus=watch)
    monitor.run_pass()
    assert events(settings.audit_path, "gpu_busy_unlocked") == []
    (warning,) = events(settings.audit_path, "lock_warning")
    assert warning["gpu"]["utilization_pct"] == 37


def test_explicit_map_limits_findings_to_named_gpus(r, settings):
    fake = FakeNvml([Device("GPU-a", processes=[(1, GIB)]), Device("GPU-b", processes=[(2, GIB)])])
    watch = GpuWatch(nvml_of(fake), {"gpu_lock:mine": "GPU-b"}, busy_grace_s=0)
    build(settings, gpus=watch).run_pass()
    assert [e["gpu"]["uuid"] for e in events(settings.audit_path, "gpu_busy_unlocked")] == ["GPU-b"]


def test_status_shows_gpu_columns(r, settings):
    fake = FakeNvml([Device("GPU-a", processes=[(1, GIB)], used=12 * GIB), Device("GPU-b", processes=[(9, GIB)])])
    hold(r, 0, "tts", age_s=10)
    snap = snapshot.take(r, settings, nvml_of(fake))
    table = report.as_table(snap)
    lines = table.splitlines()
    assert lines[0].split()[-4:] == ["GPU", "MEM", "UTIL", "PROCS"]
    assert lines[1].split()[-4:] == ["0", "12.0/80G", "37%", "1"]
    assert (
        lines[2] == "gpu 1 (NVIDIA H100 80GB HBM3): no lock; 1.0/80G, util 37%, 1 processes <- busy with no lock held"
    )
    doc = report.as_json(snap)
    assert doc["nvml"] == {"available": True, "reason": None}
    assert doc["locks"][0]["gpu"]["uuid"] == "GPU-a"
    assert [g["uuid"] for g in doc["gpus"]] == ["GPU-a", "GPU-b"]


def test_gpu_memory_utilization_and_processes_are_exported_per_gpu(r, settings):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from monitor.metrics import Metrics

    fake = FakeNvml(
        [Device("GPU-a", processes=[(1, GIB)], used=5 * GIB, util=50), Device("GPU-b", unsupported={"util"})]
    )
    monitor = build(settings, gpus=GpuWatch(nvml_of(fake), {}, busy_grace_s=60))
    metrics = Metrics(monitor)
    monitor.run_pass()
    text = generate_latest(metrics.registry).decode()
    samples = {(s.name, s.labels.get("gpu")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("gpulock_monitor_gpu_memory_used_bytes", "0")] == 5 * GIB
    assert samples[("gpulock_monitor_gpu_memory_total_bytes", "1")] == 80 * GIB
    assert samples[("gpulock_monitor_gpu_utilization_ratio", "0")] == 0.5
    assert ("gpulock_monitor_gpu_utilization_ratio", "1") not in samples
    assert samples[("gpulock_monitor_gpu_processes", "0")] == 1


def test_gpu_metrics_carry_dcgm_exporters_labels(r, settings, monkeypatch):
    """gpu, UUID, modelName and Hostname, as dcgm-exporter names them, so PromQL joins the two on UUID."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from monitor.metrics import Metrics

    monkeypatch.setenv("NODE_NAME", "gpu-node-7")  # what dcgm-exporter takes on Kubernetes, as we do
    fake = FakeNvml([Device("GPU-a", name="NVIDIA A100-SXM4-40GB")])
    monitor = build(settings, gpus=GpuWatch(nvml_of(fake), {}, busy_grace_s=60))
    metrics = Metrics(monitor)
    monitor.run_pass()
    text = generate_latest(metrics.registry).decode()
    labels = [
        s.labels
        for f in text_string_to_metric_families(text)
        if f.name.startswith("gpulock_monitor_gpu_")
        for s in f.samples
    ]
    assert len(labels) == 4
    assert all(
        label == {"gpu": "0", "UUID": "GPU-a", "modelName": "NVIDIA A100-SXM4-40GB", "Hostname": "gpu-node-7"}
        for label in labels
    ), labels
    monkeypatch.delenv("NODE_NAME")
    assert gpu.node_name() == socket.gethostname()


# --- the real no-driver path on this machine ---------------------------------------------------------

no_driver = pytest.mark.skipif(Nvml("auto").available, reason="this host has an NVIDIA driver")


@no_driver
def test_daemon_and_status_without_driver_report_it_once(r, redis_server, tmp_path):
    raw = make_settings(redis_server.url, tmp_path).redacted()
    raw["redis"]["url"] = redis_server.url
    raw["logging"]["format"] = "json"
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump(raw))
    hold(r, 0, age_s=10)
    proc = subprocess.run(
        [sys.executable, "-m", "monitor", "run", "-c", str(cfg), "--once"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    nvml_lines = [x for x in lines if x["event"].startswith("nvml")]
    assert [(x["event"], x["level"]) for x in nvml_lines] == [("nvml_unavailable", "info")]
    result = CliRunner().invoke(main, ["status", "--json", "-c", str(cfg)])
    doc = json.loads(result.stdout)
    assert doc["nvml"]["available"] is False
    assert "driver" in doc["nvml"]["reason"] or "not installed" in doc["nvml"]["reason"]
    assert doc["locks"][0]["gpu"] is None
    table = CliRunner().invoke(main, ["status", "-c", str(cfg)]).stdout
    assert "GPU" not in table.splitlines()[0]


# --- a real GPU -----------------------------------------------------------------------------------------


real_gpu = pytest.mark.skipif(
    not Nvml("auto").available or shutil.which("nvidia-smi") is None, reason="no NVIDIA driver here"
)
HOG_MIB = 512


def smi(*query: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True
    ).stdout
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]


@pytest.fixture
def gpu_hog() -> Iterator[subprocess.Popen[str]]:
    """A real process holding HOG_MIB of GPU memory until the test lets it go."""
    hog = Path(__file__).with_name("cuda_hog.py")
    proc = subprocess.Popen(
        [sys.executable, str(hog), str(HOG_MIB)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if not proc.stdin.closed:
            proc.stdin.close()
        proc.wait(timeout=60)


def gpu_running(nvml: Nvml, pid: int) -> GpuInfo | None:
    return next((g for g in nvml.snapshot().values() if any(p.pid == pid for p in g.processes or ())), None)


@pytest.mark.gpu
@real_gpu
def test_real_gpu_matches_nvidia_smi():
    gpus = Nvml("auto").snapshot()
    rows = smi("--query-gpu=index,uuid,memory.total,name,utilization.gpu")
    assert len(rows) == len(gpus)
    for index, uuid, total_mib, name, util in rows:
        g = gpus[int(index)]
        assert g.uuid == uuid
        assert g.name == name
        assert g.memory_total_bytes is not None
        assert abs(g.memory_total_bytes / (1024 * 1024) - int(total_mib)) < 1  # nvidia-smi rounds to MiB
        assert g.utilization_pct is not None
        assert 0 <= g.utilization_pct <= 100
        assert 0 <= int(util) <= 100
        assert g.processes is not None


@pytest.mark.gpu
@real_gpu
def test_real_gpu_process_is_seen_reported_and_found(r, settings, tmp_path, gpu_hog):
    nvml = Nvml("auto")
    pid = gpu_hog.pid
    gpu = wait_for(lambda: gpu_running(nvml, pid))  # the driver may list a new context a moment late
    (proc,) = [p for p in gpu.processes if p.pid == pid]
    assert proc.used_bytes is not None
    assert proc.used_bytes >= HOG_MIB << 20
    assert proc.name is not None
    assert "python" in proc.name
    assert proc.user == pwd.getpwuid(os.getuid()).pw_name
    apps = {int(row[0]): row for row in smi("--query-compute-apps=pid,gpu_uuid,used_memory")}
    assert apps[pid][1] == gpu.uuid
    assert abs(int(apps[pid][2]) - proc.used_bytes / (1 << 20)) < 1

    # The daemon: a busy GPU with no lock, then a hung holder capped while its process stays.
    monitor = build(settings, gpus=GpuWatch(nvml, {}, busy_grace_s=0))
    monitor.run_pass()
    (busy,) = [e for e in events(settings.audit_path, "gpu_busy_unlocked") if e["gpu"]["index"] == gpu.index]
    assert pid in [p["pid"] for p in busy["gpu"]["processes"]]
    hold(r, gpu.index, "hung", age_s=550)
    cfg = config_file(tmp_path, settings.redis_url)
    doc = json.loads(CliRunner().invoke(main, ["status", "--json", "-c", str(cfg)]).stdout)
    assert doc["nvml"]["available"] is True
    (row,) = doc["locks"]
    assert row["gpu"]["uuid"] == gpu.uuid
    assert pid in [p["pid"] for p in row["gpu"]["processes"]]
    monitor.run_pass()
    (released,) = events(settings.audit_path, "lock_released")
    assert released["gpu"]["uuid"] == gpu.uuid
    monitor.run_pass()
    (still,) = events(settings.audit_path, "released_gpu_busy")
    assert still["holder"] == "locked_by_hung"
    assert pid in [p["pid"] for p in still["gpu"]["processes"]]

    # The process ends: its memory goes back and NVML stops listing it.
    assert gpu_hog.stdin is not None
    gpu_hog.stdin.close()
    assert gpu_hog.wait(timeout=60) == 0
    wait_for(lambda: gpu_running(nvml, pid) is None)


@pytest.mark.gpu
@real_gpu
def test_real_gpu_hang_readings_match_nvidia_smi():
    nvml = Nvml("auto", xid_events=True)
    try:
        gpus = nvml.snapshot()
        rows = smi("--query-gpu=index,enforced.power.limit,clocks.max.sm,power.draw")
        for index, limit_w, max_sm, draw_w in rows:
            g = gpus[int(index)]
            if limit_w.replace(".", "").isdigit():
                assert g.power_limit_w is not None
                assert abs(g.power_limit_w - float(limit_w)) < 1
            if max_sm.isdigit():
                assert g.sm_clock_max_mhz == int(max_sm)
            if draw_w.replace(".", "").isdigit():
                assert g.power_w is not None
                assert 0 < g.power_w < 2 * float(draw_w) + 50
            assert g.memory_util_pct is not None
            assert 0 <= g.memory_util_pct <= 100
            for kind in (g.util_samples, g.memory_util_samples, g.power_samples):
                assert kind is None or all(s.mono <= time.monotonic() + 1 for s in kind)
            # Xid events: watched, or said to be not available (containers, some GPUs).
            assert g.xids == () or (g.xids is None and nvml.xids is not None and nvml.xids.reason)
    finally:
        nvml.shutdown()


# Kernels for the real-GPU hang test, in PTX (the driver compiles it): `spin` is one thread waiting
# on the clock, as a kernel spinning on a flag does; `burn` is every SM doing arithmetic.
_PTX = rb"""
.version 7.0
.target sm_70
.address_size 64
.visible .entry spin(.param .u64 ns) {
  .reg .u64 %rd<5>;
  .reg .pred %p;
  ld.param.u64 %rd1, [ns];
  mov.u64 %rd2, %globaltimer;
  add.u64 %rd3, %rd2, %rd1;
SPIN:
  mov.u64 %rd4, %globaltimer;
  setp.lt.u64 %p, %rd4, %rd3;
  @%p bra SPIN;
  ret;
}
.visible .entry burn(.param .u64 ns, .param .u64 out) {
  .reg .u64 %rd<6>;
  .reg .pred %p;
  .reg .f32 %f<4>;
  ld.param.u64 %rd1, [ns];
  ld.param.u64 %rd5, [out];
  mov.u64 %rd2, %globaltimer;
  add.u64 %rd3, %rd2, %rd1;
  mov.f32 %f1, 0f3F800000;
  mov.f32 %f2, 0f3F800001;
  mov.f32 %f3, 0f00000000;
BURN:
  fma.rn.f32 %f3, %f3, %f2, %f1;
  fma.rn.f32 %f3, %f3, %f2, %f1;
  fma.rn.f32 %f3, %f3, %f2, %f1;
  fma.rn.f32 %f3, %f3, %f2, %f1;
  mov.u64 %rd4, %globaltimer;
  setp.lt.u64 %p, %rd4, %rd3;
  @%p bra BURN;
  st.global.f32 [%rd5], %f3;
  ret;
}
"""

_KERNEL_RUNNER = """
import ctypes, sys
ptx, kernel, seconds = sys.argv[1].encode(), sys.argv[2], float(sys.argv[3])
cuda = ctypes.CDLL("libcuda.so.1")
def check(code, what):
    if code != 0:
        raise SystemExit(f"{what} failed with CUresult {code}")
check(cuda.cuInit(0), "cuInit")
dev = ctypes.c_int()
check(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ctx = ctypes.c_void_p()
check(cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev), "cuCtxCreate")
mod = ctypes.c_void_p()
check(cuda.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(ptx)), "cuModuleLoadData")
fn = ctypes.c_void_p()
check(cuda.cuModuleGetFunction(ctypes.byref(fn), mod, kernel.encode()), "cuModuleGetFunction")
out = ctypes.c_uint64()
check(cuda.cuMemAlloc_v2(ctypes.byref(out), ctypes.c_size_t(1 << 20)), "cuMemAlloc")
ns = ctypes.c_uint64(int(seconds * 1e9))
args = [ctypes.cast(ctypes.byref(ns), ctypes.c_void_p), ctypes.cast(ctypes.byref(out), ctypes.c_void_p)]
params = (ctypes.c_void_p * 2)(*args)
blocks, threads = (1, 1) if kernel == "spin" else (4096, 256)
check(cuda.cuLaunchKernel(fn, blocks, 1, 1, threads, 1, 1, 0, None, params, None), "cuLaunchKernel")
print("ready", flush=True)
check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
"""


def _watch_real_gpu(pid: int, seconds: float) -> list:
    """Judge a holding of the GPU `pid` runs on for `seconds`, sample by sample, with a 6 s window."""
    from monitor.hang import Evidence, HangSettings, HangWatch

    nvml = Nvml("auto")
    gpu_info = wait_for(lambda: gpu_running(nvml, pid))
    watch = HangWatch(HangSettings(idle_window_s=6.0))
    started_ms = int(time.time() * 1000)
    found: list = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        info = nvml.snapshot()[gpu_info.index]
        ev = Evidence(int(time.time() * 1000), started_ms, True, None, False, info, time.monotonic())
        found = watch.judge(b"gpu_lock:real", 1, ev) or found
    nvml.shutdown()
    return found


@pytest.mark.gpu
@real_gpu
@pytest.mark.parametrize(
    ("kernel", "kind"),
    [
        ("spin", "spin"),  # a spinning kernel: ~100 % "utilisation", power near idle, no memory traffic
        ("burn", None),  # honest work for longer than the window: never a finding
        (None, "idle"),  # blocked on the host while holding GPU memory
    ],
)
def test_real_gpu_spin_hang_and_host_block_are_found_honest_work_is_not(kernel, kind, gpu_hog):
    if kernel is None:
        found = _watch_real_gpu(gpu_hog.pid, 10)
    else:
        proc = subprocess.Popen(
            [sys.executable, "-c", _KERNEL_RUNNER, _PTX.decode(), kernel, "14"], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        try:
            assert proc.stdout.readline().strip() == "ready"
            found = _watch_real_gpu(proc.pid, 10)
        finally:
            proc.kill()
            proc.wait(timeout=60)
    idle = [f for f in found if f.finding.value == "gpu_idle_held"]
    if kind is None:
        assert idle == [], idle
    else:
        assert [f.detail["kind"] for f in idle] == [kind], found


def test_an_xid_thread_surprised_by_the_driver_goes_on(xid_nvml, monkeypatch):
    import types

    monkeypatch.setattr(gpu.XidWatch, "retry_s", 0.01)
    real = gpu.XidWatch._wait
    surprises = iter([RuntimeError("not an NVMLError"), types.SimpleNamespace(device=0)])  # then no eventType

    def wait(self: gpu.XidWatch) -> object:
        nxt = next(surprises, None)
        if isinstance(nxt, Exception):
            raise nxt
        return nxt if nxt is not None else real(self)

    monkeypatch.setattr(gpu.XidWatch, "_wait", wait)  # before the thread starts
    fake, nvml = xid_nvml
    assert nvml.available
    assert nvml.xids is not None
    fake.xid(0, 48)
    wait_for(lambda: nvml.snapshot()[0].xids, timeout_s=10)
    assert [x.code for x in nvml.snapshot()[0].xids] == [48]
    assert nvml.xids.errors == 2
