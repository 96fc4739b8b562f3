"""monitor.evidence without Redis: which record, which GPU, which watches and jobs, per lock."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from fake_pynvml import Device, FakeNvml

from monitor import protocol
from monitor.config import Settings
from monitor.evidence import Holders, identity, job_name
from monitor.gpu import Nvml
from monitor.gpuwatch import GpuWatch
from monitor.hang import HangWatch
from monitor.protocol import own_record
from monitor.scanner import Observation
from monitor.verdict import Verdict, evaluate

NOW = 1_800_000_000_000
UUID_B = "GPU-5f0c1a3e-8d2b-4c6f-9a7e-0b1c2d3e4f50"


def record(token: str = "t", **kw: Any) -> bytes:  # noqa: S107 - a lock token, not a secret
    facts: protocol.ProcessFacts = {"host": "h", "pid": 4242, "pid_ns": 1, "start_time": 7, "boot_id": "b"}
    return protocol.holder_record(task="tts", token=token, heartbeat_interval_s=30, process=facts, **kw)


def obs(key: bytes, token: str = "t", holder: bytes | None = None) -> Observation:  # noqa: S107 - as above
    value = protocol.lock_value(f"tts#{token}")
    return Observation(key, NOW, value, NOW + 600_000, b"1", NOW + 60_000, None, holder=holder, record_atomic=True)


def verdicts(*observations: Observation) -> list[Verdict]:
    return evaluate(list(observations), Settings())


class Pids:
    def __init__(self, running: bool = True) -> None:
        self.running = running
        self.watched: dict[bytes, tuple[str, int]] = {}
        self.unwatched: list[bytes] = []

    def watch(self, key: bytes, token: str, pid: int, start_time: int) -> bool:
        if self.running:
            self.watched[key] = (token, pid)
        return self.running

    def unwatch(self, key: bytes) -> None:
        self.unwatched.append(key)
        self.watched.pop(key, None)

    def watching(self) -> dict[bytes, tuple[str, int]]:
        return dict(self.watched)


class Jobs:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.written: list[dict[str, str | None]] = []
        self.cleared = 0

    def write(self, holders: Any) -> None:
        if self.fail:
            raise PermissionError(13, "read-only")
        self.written.append(dict(holders))

    def clear(self) -> None:
        self.cleared += 1
        if self.fail:
            raise PermissionError(13, "read-only")


def gpus(*devices: Device) -> GpuWatch:
    fake = FakeNvml(list(devices))
    watch = GpuWatch(Nvml("auto", load=lambda: fake.module), {}, 60)
    watch.refresh()
    return watch


def test_own_record_is_the_holdings_own_or_none():
    value = protocol.lock_value("tts#t")
    assert own_record(None, value) is None
    assert own_record(b"not json", value) is None
    assert own_record(record(token="u"), value) is None  # an earlier holding's
    mine = own_record(record(), value)
    assert mine is not None
    assert identity(mine) == "t:4242:7"


def test_a_job_is_the_task_id_else_the_task():
    value = protocol.lock_value("tts#t")
    assert job_name(None, value) == "tts#t"
    with_id = own_record(record(task_id="job-7"), value)
    assert job_name(with_id, value) == "job-7"


def test_the_gpu_is_the_one_the_record_names_else_the_locks_own():
    watch = gpus(Device("GPU-aaa"), Device(UUID_B))
    holders = Holders(HangWatch(Settings().hang), gpus=watch)
    assert Holders(HangWatch(Settings().hang)).gpu(b"gpu_lock:0", None) is None  # no NVML at all
    named = own_record(record(gpu_uuid=UUID_B), protocol.lock_value("tts#t"))
    found = holders.gpu(b"gpu_lock:0", named)
    assert found is not None
    assert found.uuid == UUID_B  # the record's, not device 0
    elsewhere = own_record(record(gpu_uuid="GPU-00000000-0000-0000-0000-000000000000"), protocol.lock_value("tts#t"))
    fallback = holders.gpu(b"gpu_lock:0", elsewhere)
    assert fallback is not None
    assert fallback.index == 0  # a GPU not on this host: the lock's own


def test_watches_follow_the_holding_and_jobs_name_each_gpus_holder(tmp_path: Path):
    pids, jobs = Pids(), Jobs()
    holders = Holders(
        HangWatch(Settings().hang),
        gpus=gpus(Device("GPU-a"), Device("GPU-b")),
        pids=pids,
        jobs=jobs,
        watchable=lambda r: True,
    )
    first = obs(b"gpu_lock:0", "t", record("t", task_id="job-1"))
    other = obs(b"gpu_lock:9", "u", record("u"))  # guards no GPU of this host
    holders.seen([first, other])
    assert set(pids.watched) == {b"gpu_lock:0", b"gpu_lock:9"}
    holders.after_pass(verdicts(first, other))
    assert jobs.written[-1] == {"0": "job-1", "1": None}
    assert set(holders.lock_gpus) == {b"gpu_lock:0"}
    # The next holding of gpu_lock:0, and gpu_lock:9 gone: their watches end.
    second = obs(b"gpu_lock:0", "v", record("v"))
    holders.seen([second])
    holders.after_pass(verdicts(second))
    assert b"gpu_lock:9" in pids.unwatched
    assert jobs.written[-1] == {"0": "tts#v", "1": None}
    holders.close()
    assert jobs.cleared == 1


def test_a_holder_already_gone_is_said_once(tmp_path: Path):
    pids = Pids(running=False)
    holders = Holders(HangWatch(Settings().hang), pids=pids, watchable=lambda r: True)
    o = obs(b"gpu_lock:0", "t", record("t"))
    holders.seen([o])
    (v,) = verdicts(o)
    holders.judge(v)  # asks again: the same process is not said gone twice
    assert holders.take_gone() == [(b"gpu_lock:0", "t:4242:7")]
    assert holders.take_gone() == []


def test_a_job_map_that_cannot_be_written_is_said_once_and_never_raises(capsys: pytest.CaptureFixture[str]):
    jobs = Jobs(fail=True)
    holders = Holders(HangWatch(Settings().hang), gpus=gpus(Device("GPU-a")), jobs=jobs)
    o = obs(b"gpu_lock:0")
    for _ in range(3):
        holders.after_pass(verdicts(o))
    holders.close()
    assert holders.job_errors == 3
    assert jobs.cleared == 1


def test_a_real_job_map_directory(tmp_path: Path):
    from monitor.jobmap import JobMap

    holders = Holders(HangWatch(Settings().hang), gpus=gpus(Device("GPU-a")), jobs=JobMap(tmp_path))
    o = obs(b"gpu_lock:0", "t", record("t", task_id="job-1"))
    holders.seen([o])
    holders.after_pass(verdicts(o))
    assert (tmp_path / "0").read_text() == "job-1\n"
    holders.close()
    assert (tmp_path / "0").read_text() == ""
    assert os.access(tmp_path / "0", os.R_OK)


def test_a_legacy_lock_on_another_host_costs_nothing_and_has_no_findings():
    holders = Holders(HangWatch(Settings().hang))
    legacy = obs(b"gpu_lock:7")  # no holder record, no GPU of this host
    holders.seen([legacy])
    assert holders.pass_findings(verdicts(legacy), NOW) == []
    assert holders.current == {}
    holders.close()  # no job map: nothing to empty
