"""What monitor.evidence keeps of thousands of holder records: each parsed once per record written,
its repeated values one object each, and still the record as written."""

from __future__ import annotations

import json

from monitor import protocol
from monitor.config import Settings
from monitor.evidence import Holders
from monitor.hang import HangWatch
from monitor.scanner import Observation

NOW = 1_800_000_000_000


def taken(i: int, *, host: str = "gpu-node-1", progress_ms: int | None = None) -> Observation:
    token = f"{i:032x}"
    facts: protocol.ProcessFacts = {"host": host, "pid": 100 + i, "pid_ns": 4026531836, "start_time": i, "boot_id": "b"}
    raw = protocol.holder_record(task="tts", token=token, heartbeat_interval_s=60, process=facts)
    if progress_ms is not None:  # a progress mark, as PROGRESS_SCRIPT rewrites the record
        raw = json.dumps({**json.loads(raw), "progress_ms": progress_ms}).encode()
    value = protocol.lock_value(f"tts#{token}")
    key = f"gpu_lock:{i}".encode()
    return Observation(key, NOW, value, NOW + 600_000, b"1", NOW + 60_000, None, holder=raw, record_atomic=True)


def test_records_of_one_host_share_its_values_and_read_as_written():
    holders = Holders(HangWatch(Settings().hang))
    a, b = taken(1), taken(2)
    holders.seen([a, b])
    ra, rb = holders.record(a.key, a.value), holders.record(b.key, b.value)  # type: ignore[arg-type]
    assert ra == protocol.parse_holder_record(a.holder)
    assert rb == protocol.parse_holder_record(b.holder)
    assert ra is not None
    assert rb is not None
    for name in ("host", "boot_id", "task", "pid_ns", "heartbeat_interval_s"):
        assert ra[name] is rb[name], name  # type: ignore[literal-required]
    assert ra["token"] != rb["token"]


def test_a_record_is_parsed_once_until_it_is_written_again():
    holders = Holders(HangWatch(Settings().hang))
    first = taken(1)
    holders.seen([first])
    parsed = holders.record(first.key, first.value)  # type: ignore[arg-type]
    holders.seen([taken(1)])  # read again, unchanged (other bytes objects, the same bytes)
    assert holders.record(first.key, first.value) is parsed  # type: ignore[arg-type]
    marked = taken(1, progress_ms=NOW)
    holders.seen([marked])
    again = holders.record(marked.key, marked.value)  # type: ignore[arg-type]
    assert again is not None
    assert again["progress_ms"] == NOW
    assert holders.record(marked.key, b"locked_by_someone_else") is None  # not that holding's record


def test_values_of_records_gone_are_not_kept():
    holders = Holders(HangWatch(Settings().hang))
    gone = [taken(i, host=f"gone-{i}") for i in range(100)]
    holders.seen(gone)
    for o in gone:
        holders.record(o.key, o.value)  # type: ignore[arg-type]
    holders.seen([Observation(o.key, NOW, None, -2, None, -2, None) for o in gone])
    holders.after_pass([])
    assert sum(len(v) for v in holders._values.values()) == 0
