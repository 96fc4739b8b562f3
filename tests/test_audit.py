"""The JSONL writer: whole lines or none, even on a full disk; rotation; hostile data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from monitor import audit_read
from monitor.audit import MAX_PENDING, AuditLog, JsonlFile
from monitor.errors import AuditWriteError, MonitorError


def lines(path):
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_every_event_has_schema_version_utc_time_name_and_monitor_pid(tmp_path):
    log = AuditLog(JsonlFile(tmp_path / "a.jsonl"))
    log.event("monitor_started", now=0.0, dry_run=False)
    (event,) = lines(tmp_path / "a.jsonl")
    assert event["v"] == 1
    assert event["ts"] == "1970-01-01T00:00:00.000+00:00"
    assert event["event"] == "monitor_started"
    assert event["monitor"]["pid"] == os.getpid()


def test_hostile_values_stay_on_one_line(tmp_path):
    f = JsonlFile(tmp_path / "a.jsonl")
    nasty = 'a\nb\r\n"},{"event":"forged"\u2028\x00\udcff'.encode("utf-8", "surrogatepass").decode(
        "utf-8", "backslashreplace"
    )
    f.write({"holder": nasty})
    f.write({"holder": "next"})
    raw = (tmp_path / "a.jsonl").read_bytes()
    assert raw.count(b"\n") == 2
    assert [e["holder"] for e in lines(tmp_path / "a.jsonl")] == [nasty, "next"]


def test_creates_directory_and_closes_torn_last_line(tmp_path):
    path = tmp_path / "sub" / "dir" / "a.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"event": "ok"}\n{"event": "to')  # another writer crashed mid-line
    f = JsonlFile(path)
    f.write({"event": "after"})
    assert path.read_bytes().splitlines()[-1] == b'{"event": "after"}'


def test_open_fails_on_bad_path(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"File exists|Not a directory"):
        JsonlFile(tmp_path / "file" / "a.jsonl").open()


def test_write_error_keeps_event_pending_until_disk_works(tmp_path):
    (tmp_path / "file").write_text("")
    f = JsonlFile(tmp_path / "file" / "a.jsonl")
    with pytest.raises(AuditWriteError):
        f.write({"n": 1})
    assert f.pending == 1
    assert f.failures == 1
    f.path = tmp_path / "a.jsonl"
    f.write({"n": 2}, sync=True)
    assert [e["n"] for e in lines(f.path)] == [1, 2]
    assert f.pending == 0


def test_pending_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr("monitor.audit.MAX_PENDING", 3)
    (tmp_path / "file").write_text("")
    f = JsonlFile(tmp_path / "file" / "a.jsonl")
    for n in range(5):
        with pytest.raises(AuditWriteError):
            f.write({"n": n})
    assert f.pending == 3
    assert f.dropped == 2
    assert MAX_PENDING > 1000


def test_dev_full_raises_and_nothing_is_lost(tmp_path):
    f = JsonlFile("/dev/full")
    with pytest.raises(AuditWriteError, match="No space left"):
        f.write({"n": 1})
    assert f.pending == 1


def test_full_disk_never_leaves_a_torn_line(tmp_path):
    # RLIMIT_FSIZE makes the kernel cut a write short exactly as a full disk does.
    path = tmp_path / "a.jsonl"
    script = textwrap.dedent(
        f"""
        import json, resource, signal
        from monitor.audit import JsonlFile
        from monitor.errors import AuditWriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        f = JsonlFile({str(path)!r})
        f.write({{"n": 0, "pad": "x" * 50}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))
        try:
            f.write({{"n": 1, "pad": "y" * 200}})
        except AuditWriteError as exc:
            print("failed:", exc)
        torn = open({str(path)!r}, "rb").read()
        print("size-after-failure", len(torn))
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        f.write({{"n": 2}})
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "failed:" in out
    size = int(out.split("size-after-failure ")[1].split()[0])
    assert size == len(json.dumps({"n": 0, "pad": "x" * 50}, ensure_ascii=False)) + 1
    assert [e["n"] for e in lines(path)] == [0, 1, 2]


def test_rotation_keeps_every_event_once_in_order(tmp_path):
    path = tmp_path / "a.jsonl"
    f = JsonlFile(path, max_bytes=1024, backups=3)
    for n in range(60):
        f.write({"n": n, "pad": "x" * 40})
    files = [path.with_name("a.jsonl.3"), path.with_name("a.jsonl.2"), path.with_name("a.jsonl.1"), path]
    assert all(p.exists() for p in files)
    assert not path.with_name("a.jsonl.4").exists()
    numbers = [e["n"] for p in files for e in lines(p)]
    assert numbers == list(range(numbers[0], 60))
    assert all(p.stat().st_size <= 1024 for p in files)


def test_rotation_without_backups_starts_afresh(tmp_path):
    path = tmp_path / "a.jsonl"
    f = JsonlFile(path, max_bytes=1024, backups=0)
    for n in range(40):
        f.write({"n": n, "pad": "x" * 40})
    assert lines(path)[-1]["n"] == 39
    assert list(tmp_path.iterdir()) == [path]


def test_open_on_unseekable_file_fails_without_leaking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="Illegal seek"):
        JsonlFile(fifo).open()
    assert len(os.listdir("/proc/self/fd")) == before


def test_close_then_write_reopens(tmp_path):
    f = JsonlFile(tmp_path / "a.jsonl")
    f.write({"n": 1})
    f.close()
    f.close()
    f.write({"n": 2})
    assert [e["n"] for e in lines(tmp_path / "a.jsonl")] == [1, 2]


# --- reading: what `gpulock-monitor audit` is built on -------------------------------------------


def test_parse_lines_skips_foreign_and_torn_lines():
    data = b'{"event": "a"}\nnot json\n[1, 2]\n\xff\xfe\n{"event": "b"}\n{"event": "to'
    assert [r["event"] for r in audit_read.parse_lines(data)] == ["a", "b"]


@pytest.mark.parametrize(
    ("record", "kept"),
    [
        ({"event": "lock_released", "lock_key": "gpu_lock:0", "ts": "2026-01-02T00:00:00+00:00"}, True),
        ({"event": "lock_warning", "lock_key": "gpu_lock:0", "ts": "2026-01-02T00:00:00+00:00"}, False),
        ({"event": "lock_released", "lock_key": "gpu_lock:1", "ts": "2026-01-02T00:00:00+00:00"}, False),
        ({"event": "lock_released", "lock_key": "gpu_lock:0", "ts": "2025-12-31T23:59:59+00:00"}, False),
        ({"event": "lock_released", "lock_key": "gpu_lock:0", "ts": "garbage"}, False),
        ({"event": "lock_released", "lock_key": "gpu_lock:0"}, False),
    ],
)
def test_filter_keeps_only_records_of_the_event_lock_and_time_asked_for(record, kept):
    since = audit_read.parse_since("2026-01-01T00:00:00Z", now=0.0)
    assert audit_read.Filter(since=since, lock="gpu_lock:0", event="lock_released")(record) is kept


def test_describe_is_one_line_with_the_fields_an_operator_reads():
    line = audit_read.describe(
        {
            "ts": "2026-01-02T00:00:00+00:00",
            "event": "lock_released",
            "lock_key": "gpu_lock:0",
            "holder": 'locked_by_"x"\nnext',
            "held_s": 930.5,
            "heartbeat": "dead",
            "tier": "hard",
            "reason": "heartbeat_dead",
            "outcome": "released",
            "operator": None,
        }
    )
    assert "\n" not in line
    assert line == (
        '2026-01-02T00:00:00+00:00  lock_released         gpu_lock:0  holder="locked_by_\\"x\\"\\nnext"  '
        'held=15m30s  heartbeat="dead"  tier="hard"  reason="heartbeat_dead"  outcome="released"'
    )


def test_describe_shows_held_time_as_status_and_release_do():
    line = audit_read.describe({"ts": "t", "event": "lock_released", "lock_key": "gpu_lock:0", "held_s": 24.388})
    assert line.endswith("gpu_lock:0  held=24.4s")
    assert "held=6m52s" in audit_read.describe({"event": "manual_release", "held_s": 412.9})
    assert "held" not in audit_read.describe({"event": "monitor_started"})


def test_read_skips_a_file_rotated_away_meanwhile(tmp_path, monkeypatch):
    live = tmp_path / "audit.jsonl"
    live.write_text('{"event": "live"}\n')
    gone = tmp_path / "audit.jsonl.1"  # listed, then removed by the rotation before it was read
    monkeypatch.setattr(audit_read, "log_files", lambda _path: [gone, live])
    assert [r["event"] for r in audit_read.read(live)] == ["live"]


def test_follow_without_history_starts_at_the_end(tmp_path):
    live = tmp_path / "audit.jsonl"
    live.write_text('{"event": "old"}\n')
    seen = []

    def stop() -> bool:
        if not seen:
            with live.open("a") as f:
                f.write('{"event": "new"}\n')
        return bool(seen)

    for record in audit_read.follow(live, stop=stop, history=False, poll_s=0.01):
        seen.append(record["event"])
    assert seen == ["new"]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64 * 1024])
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b'{"n": 1}',  # one line still being written
        b'{"n": 1}\n',
        b'{"n": 1}\n{"n": 2}\n{"n": 3}\n{"n": 4',
        b'\n\n{"n": 1}\nnot json\n\n{"n": 22222}\n[3]\n{"n": 3}\n',
    ],
)
def test_reading_backwards_finds_the_whole_lines_forwards_reading_finds(tmp_path, monkeypatch, data, block):
    monkeypatch.setattr(audit_read, "BLOCK", block)
    path = tmp_path / "audit.jsonl"
    path.write_bytes(data)
    forwards = list(audit_read.parse_lines(data[: data.rfind(b"\n") + 1]))
    with path.open("rb") as handle:
        assert list(audit_read._records_backwards(handle, len(data)))[::-1] == forwards
        assert audit_read._line_start(handle, len(data)) == data.rfind(b"\n") + 1
    assert audit_read.last(path, None) == forwards


def opened_files(monkeypatch) -> list[str]:
    """The names of the files audit_read opens from now on."""
    opened: list[str] = []
    real_open = Path.open

    def recording_open(self, *args, **kw):
        opened.append(self.name)
        return real_open(self, *args, **kw)

    monkeypatch.setattr(Path, "open", recording_open)
    return opened


def numbered_log(live: Path, files: int, per_file: int) -> None:
    """`files` files of `per_file` records numbered from 0, the oldest in the highest rotation."""
    for number in range(files):
        name = live.name + (f".{files - 1 - number}" if number < files - 1 else "")
        rows = range(number * per_file, (number + 1) * per_file)
        live.with_name(name).write_text("".join(json.dumps({"event": "e", "n": n}) + "\n" for n in rows))


def test_last_reads_only_as_far_back_as_it_takes(tmp_path, monkeypatch):
    live = tmp_path / "audit.jsonl"
    numbered_log(live, files=4, per_file=10_000)  # audit.jsonl.3 ... .1, then the live file
    monkeypatch.setattr(audit_read, "BLOCK", 4096)
    opened = opened_files(monkeypatch)
    reads: list[int] = []
    real_read = audit_read._records_backwards

    def counting(handle, end):
        for record in real_read(handle, end):
            reads.append(handle.tell())
            yield record

    monkeypatch.setattr(audit_read, "_records_backwards", counting)
    assert [r["n"] for r in audit_read.last(live, 3)] == [39_997, 39_998, 39_999]
    assert opened == ["audit.jsonl"]
    assert min(reads) > live.stat().st_size - 2 * 4096  # the last block or two, not the file
    opened.clear()
    assert [r["n"] for r in audit_read.last(live, 10_005)] == list(range(29_995, 40_000))
    assert opened == ["audit.jsonl", "audit.jsonl.1"]


def test_last_with_a_filter_goes_back_until_it_has_enough(tmp_path):
    live = tmp_path / "audit.jsonl"
    numbered_log(live, files=3, per_file=10)
    keep = audit_read.Filter(event="e")
    only_old = [r["n"] for r in audit_read.last(live, 5, lambda r: keep(r) and r["n"] < 4)]
    assert only_old == [0, 1, 2, 3]
    with pytest.raises(MonitorError, match="no audit log at"):
        audit_read.last(tmp_path / "none.jsonl", 5)


def test_last_stops_at_a_record_older_than_since_by_more_than_a_clock_step(tmp_path, monkeypatch):
    live = tmp_path / "audit.jsonl"
    rows = [("2026-01-01T00:00:00Z", 0), ("2026-01-01T01:00:00Z", 1), ("2026-01-01T02:00:00Z", 2)]
    rows += [("2026-01-01T01:58:00Z", 3), ("garbage", 4), ("2026-01-01T02:05:00Z", 5)]  # a clock step back
    live.write_text("".join(json.dumps({"ts": ts, "n": n}) + "\n" for ts, n in rows))
    since = audit_read.parse_since("2026-01-01T02:00:00Z", 0)
    assert [r["n"] for r in audit_read.last(live, None, audit_read.Filter(since=since), since=since)] == [2, 5]
    stopped = audit_read.last(live, None, since=since)  # what was looked at: back to 01:00, not 00:00
    assert [r["n"] for r in stopped] == [2, 3, 4, 5]


def test_follow_with_lines_shows_the_last_then_every_new_line_across_rotations(tmp_path):
    live = tmp_path / "audit.jsonl"
    numbered_log(live, files=2, per_file=3)  # audit.jsonl.1: 0-2, audit.jsonl: 3-5
    with live.open("a") as f:
        f.write('{"event": "e", "n": 6')  # being written as we start
    done: list[bool] = []
    records = audit_read.follow(live, stop=lambda: bool(done), poll_s=0.01, lines=4)
    assert [next(records)["n"] for _ in range(4)] == [2, 3, 4, 5]
    with live.open("a") as f:
        f.write("}\n")
    assert next(records)["n"] == 6
    live.rename(live.with_name("audit.jsonl.1"))
    live.write_text(json.dumps({"n": 7}) + "\n")
    assert next(records)["n"] == 7
    done.append(True)
    assert list(records) == []


def test_follow_with_no_lines_starts_at_the_end_and_waits_for_a_missing_log(tmp_path):
    live = tmp_path / "audit.jsonl"
    numbered_log(live, files=2, per_file=3)
    records = audit_read.follow(live, stop=lambda: False, poll_s=0.01, lines=0)

    def append() -> None:
        with live.open("a") as f:
            f.write(json.dumps({"n": 6}) + "\n")

    threading.Timer(0.2, append).start()
    assert next(records)["n"] == 6  # a generator starts on the first next(): before the write
    later = tmp_path / "later.jsonl"
    missing = audit_read.follow(later, stop=lambda: False, poll_s=0.01, lines=10)
    threading.Timer(0.2, lambda: later.write_text(json.dumps({"n": 0}) + "\n")).start()
    assert next(missing)["n"] == 0


# --- the file changed under the writer: deleted, renamed, replaced (checked before each write) ------


def test_file_deleted_under_the_writer_is_created_again(tmp_path):
    path = tmp_path / "a.jsonl"
    f = JsonlFile(path)
    f.write({"n": 1})
    path.unlink()  # an operator's `rm`, a cleanup script
    f.write({"n": 2})
    f.write({"n": 3})
    assert [e["n"] for e in lines(path)] == [2, 3]


def test_file_renamed_away_keeps_the_lines_until_a_new_one_is_created(tmp_path):
    path = tmp_path / "a.jsonl"
    f = JsonlFile(path)
    f.write({"n": 1})
    path.rename(tmp_path / "a.jsonl.1")  # a rotation under way: the new file is not there yet
    f.write({"n": 2})
    assert not path.exists()  # logrotate's `create` fails on a file that is there already
    path.touch()
    f.write({"n": 3})
    assert [e["n"] for e in lines(tmp_path / "a.jsonl.1")] == [1, 2]
    assert [e["n"] for e in lines(path)] == [3]


def test_file_replaced_under_the_writer_gets_the_next_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    f = JsonlFile(path)
    f.write({"n": 1})
    path.rename(tmp_path / "a.jsonl.1")
    path.write_bytes(b'{"n": 0}\n')  # logrotate's `create`: a new file at the path
    f.write({"n": 2})
    assert [e["n"] for e in lines(tmp_path / "a.jsonl.1")] == [1]
    assert [e["n"] for e in lines(path)] == [0, 2]


def test_path_unreachable_under_the_writer_keeps_the_line_until_it_is_back(tmp_path):
    path = tmp_path / "dir" / "a.jsonl"
    f = JsonlFile(path)
    f.write({"n": 1})
    path.unlink()
    path.parent.rmdir()
    path.parent.write_text("")  # the directory is now a file: the path cannot be reached (ENOTDIR)
    with pytest.raises(AuditWriteError, match=r"File exists|Not a directory"):
        f.write({"n": 2})
    assert (f.pending, f.failures) == (1, 1)
    assert f.error is not None
    assert str(path) in f.error
    path.parent.unlink()
    f.write({"n": 3})
    assert [e["n"] for e in lines(path)] == [2, 3]


def test_descriptor_closed_under_the_writer_fails_once_and_loses_nothing(tmp_path):
    path = tmp_path / "a.jsonl"
    f = JsonlFile(path)
    f.write({"n": 1})
    assert f._fd is not None
    os.close(f._fd)  # the check's fstat fails (EBADF): the write fails, the line is kept
    with pytest.raises(AuditWriteError, match="Bad file descriptor"):
        f.write({"n": 2})
    assert f.pending == 1
    f.write({"n": 3})
    assert [e["n"] for e in lines(path)] == [1, 2, 3]


def test_unchanged_file_is_not_reopened(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    f = JsonlFile(path)
    f.write({"n": 1})
    opened = []
    real_open = os.open
    monkeypatch.setattr("monitor.audit.os.open", lambda *a, **kw: opened.append(a) or real_open(*a, **kw))
    for n in range(2, 5):
        f.write({"n": n})
    assert opened == []
    assert [e["n"] for e in lines(path)] == [1, 2, 3, 4]
