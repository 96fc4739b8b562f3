"""The holder record `<lock_key>:holder` (DESIGN.md section 2): its format, read tolerantly."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

from monitor import protocol

UUID = "GPU-5f0c1a3e-8d2b-4c6f-9a7e-0b1c2d3e4f50"
PROCESS: protocol.ProcessFacts = {"host": "gpu-node-3", "pid": 4242, "pid_ns": 4026531836, "start_time": 81234567}


def uptime_ticks() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")


# --- the format --------------------------------------------------------------------------------------


def test_builder_writes_every_field_in_order_and_parse_reads_it_back():
    raw = protocol.holder_record(
        task="tts_synthesize",
        token="9b1e2f3a4c5d",
        heartbeat_interval_s=60,
        task_id="c0ffee",
        gpu_uuid=UUID,
        progress_timeout_s=120,
        process=PROCESS,
    )
    doc = json.loads(raw)
    assert list(doc) == list(protocol.HOLDER_FIELDS)
    assert doc == {
        "v": 1,
        "host": "gpu-node-3",
        "pid": 4242,
        "pid_ns": 4026531836,
        "start_time": 81234567,
        "gpu_uuid": UUID,
        "task": "tts_synthesize",
        "task_id": "c0ffee",
        "token": "9b1e2f3a4c5d",
        "heartbeat_interval_s": 60,
        "heartbeats": True,
        "progress_ms": None,
        "progress_timeout_s": 120,
    }
    assert b" " not in raw  # compact: it is read once per lock per pass
    assert protocol.parse_holder_record(raw) == doc
    assert protocol.parse_holder_record(raw.decode()) == doc
    assert set(protocol.HolderRecord.__annotations__) == set(protocol.HOLDER_FIELDS)


def test_builder_describes_this_process_unless_told():
    doc = json.loads(protocol.holder_record(task="t", token="x", heartbeat_interval_s=1))
    assert doc["host"] == socket.gethostname()
    assert doc["pid"] == os.getpid()
    assert doc["pid_ns"] == os.stat("/proc/self/ns/pid").st_ino
    assert doc["start_time"] == protocol.process_start_time(os.getpid())


def test_builder_refuses_what_no_reader_would_take():
    with pytest.raises(ValueError, match="Out of range"):
        protocol.holder_record(task="t", token="x", heartbeat_interval_s=math.nan, process=PROCESS)
    with pytest.raises(ValueError, match="readers ignore one over 65536"):
        protocol.holder_record(task="t" * 70_000, token="x", heartbeat_interval_s=1, process=PROCESS)


GOOD = json.loads(protocol.holder_record(task="tts", token="abc", heartbeat_interval_s=1, process=PROCESS))


def variant(**fields: Any) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


@pytest.mark.parametrize(
    "raw",
    [
        None,
        0,
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[]",
        b"null",
        b'"a string"',
        b"{",
        b"[" * 100_000 + b"]" * 100_000,  # deeper than json can go
        b'{"v": 1, "token": "abc", "pid": NaN}',
        b'{"v": 1, "token": "abc", "pid": 1' + b"0" * 5000 + b"}",  # more digits than int() takes
        variant(v=2),
        variant(v="1"),
        variant(v=True),
        variant(v=None),
        variant(token=""),
        variant(token=7),
        variant(token=None),
        b'{"token": "abc"}',
        b"x" * (protocol.HOLDER_RECORD_MAX_BYTES + 1),
        variant(host="h" * protocol.HOLDER_RECORD_MAX_BYTES),
    ],
    ids=repr,
)
def test_parse_takes_garbage_as_no_record(raw):
    assert protocol.parse_holder_record(raw) is None


@pytest.mark.parametrize(
    ("fields", "reads"),
    [
        ({"pid": "4242"}, {"pid": None}),
        ({"pid": True}, {"pid": None}),
        ({"pid": 0}, {"pid": None}),
        ({"pid": -1}, {"pid": None}),
        ({"pid": 4242.0}, {"pid": 4242}),  # Redis's cjson writes numbers back as doubles
        ({"pid": 4242.5}, {"pid": None}),
        ({"pid_ns": [1]}, {"pid_ns": None}),
        ({"start_time": 0}, {"start_time": 0}),
        ({"start_time": -5}, {"start_time": None}),
        ({"host": 7}, {"host": None}),
        ({"gpu_uuid": {"a": 1}}, {"gpu_uuid": None}),
        ({"heartbeats": "yes"}, {"heartbeats": False}),
        ({"heartbeats": 1}, {"heartbeats": False}),
        ({"heartbeat_interval_s": 0}, {"heartbeat_interval_s": None}),
        ({"heartbeat_interval_s": "60"}, {"heartbeat_interval_s": None}),
        ({"progress_ms": 1.7e12}, {"progress_ms": 1_700_000_000_000}),
        ({"progress_ms": -1}, {"progress_ms": None}),
        ({"progress_timeout_s": 0.25}, {"progress_timeout_s": 0.25}),
        ({"progress_timeout_s": False}, {"progress_timeout_s": None}),
        ({"task": None, "task_id": 12}, {"task": None, "task_id": None}),
    ],
)
def test_parse_reads_a_field_of_the_wrong_type_as_absent(fields, reads):
    assert protocol.parse_holder_record(variant(**fields)) == {**GOOD, **reads}


def test_parse_keeps_only_the_fields_it_knows():
    parsed = protocol.parse_holder_record(variant(future_field="x"))
    assert parsed == GOOD


def test_parse_reads_a_number_too_large_for_a_float_as_absent():
    parsed = protocol.parse_holder_record(b'{"v":1,"token":"abc","heartbeat_interval_s":1e400,"pid":1e400}')
    assert parsed is not None
    assert (parsed["heartbeat_interval_s"], parsed["pid"]) == (None, None)  # json reads both as inf


@pytest.mark.parametrize(
    ("task", "token", "value", "matches"),
    [
        ("tts", "abc", b"locked_by_tts#abc", True),
        ("a#b", "abc", b"locked_by_a#b#abc", True),  # a task name may hold the separator
        ("tts", "abc", b"locked_by_tts#abd", False),  # the next holding of the same task
        ("tts", "abc", b"locked_by_tts", False),  # a legacy worker's lock beside a stale record
        (None, "abc", b"locked_by_None#abc", False),
    ],
)
def test_a_record_belongs_to_the_lock_value_it_was_written_with(task, token, value, matches):
    parsed = protocol.parse_holder_record(variant(task=task, token=token))
    assert parsed is not None
    assert protocol.holder_record_matches(parsed, value) is matches


@pytest.mark.parametrize(
    ("env", "uuid"),
    [
        ({"CUDA_VISIBLE_DEVICES": UUID}, UUID),
        ({"CUDA_VISIBLE_DEVICES": f" {UUID} "}, UUID),
        ({"CUDA_VISIBLE_DEVICES": UUID.lower().replace("gpu-", "GPU-")}, UUID.lower().replace("gpu-", "GPU-")),
        ({"CUDA_VISIBLE_DEVICES": "MIG-" + UUID[4:]}, "MIG-" + UUID[4:]),
        ({"CUDA_VISIBLE_DEVICES": f"MIG-{UUID}/1/0"}, f"MIG-{UUID}/1/0"),  # drivers before R470
        ({"CUDA_VISIBLE_DEVICES": "0"}, None),  # an index: which GPU it is, only CUDA knows
        ({"CUDA_VISIBLE_DEVICES": f"{UUID},GPU-00000000-0000-0000-0000-000000000000"}, None),
        ({"CUDA_VISIBLE_DEVICES": "GPU-5f0c1a3e"}, None),  # a prefix CUDA accepts; NVML names none
        ({"CUDA_VISIBLE_DEVICES": ""}, None),
        ({}, None),
    ],
)
def test_the_gpu_is_known_when_cuda_visible_devices_names_one_uuid(env, uuid):
    assert protocol.visible_gpu_uuid(env) == uuid


def test_process_facts_of_another_process_and_of_none():
    # A command name with spaces and parentheses: the stat line must be split after the last ")".
    child = subprocess.Popen(
        [sys.executable, "-c", "open('/proc/self/comm','w').write('a) b (c'); import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        wait_for(lambda: Path(f"/proc/{child.pid}/comm").read_text().strip() == "a) b (c")
        started = protocol.process_start_time(child.pid)
        assert started is not None
        assert protocol.process_start_time() is not None
        assert protocol.process_start_time() <= started  # this test's process is the older
        assert abs(started - uptime_ticks()) < 30 * os.sysconf("SC_CLK_TCK")  # started just now
        assert protocol.pid_namespace(child.pid) == protocol.pid_namespace()
    finally:
        child.communicate(timeout=10)
    assert protocol.process_start_time(child.pid) is None  # reaped: no /proc entry
    assert protocol.pid_namespace(child.pid) is None
