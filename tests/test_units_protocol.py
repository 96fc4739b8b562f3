"""Pure tables for units (time) and protocol (names, codes, printing): no Redis."""

from __future__ import annotations

import pytest

from monitor import protocol, units
from monitor.errors import ReleaseError
from monitor.protocol import Outcome


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("1d12h", 129600.0),
        ("1w", 604800.0),
        ("250ms", 0.25),
        ("0.5s", 0.5),
        ("1h1m1s", 3661.0),
        ("", None),
        ("90", None),
        ("1x", None),
        ("1m 30s", None),
        ("m", None),
        ("-1s", None),
        ("1m30", None),
    ],
)
def test_parse_span_reads_unit_suffixed_spans_and_nothing_else(text, seconds):
    assert units.parse_span(text) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0.0s"),
        (42, "42.0s"),
        (59.94, "59.9s"),
        (60, "1m00s"),
        (312, "5m12s"),
        (3600, "1h00m"),
        (7500, "2h05m"),
        (86400, "1d00h"),
        (273600, "3d04h"),
    ],
)
def test_human_prints_short_durations(seconds, text):
    assert units.human(seconds) == text


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("1970-01-01T00:00:00Z", 0.0),
        ("1970-01-01T00:00:00", 0.0),  # naive means UTC
        ("1970-01-01T01:00:00+01:00", 0.0),
        ("2026-11-23T12:00:00.250+00:00", 1795435200.25),
    ],
)
def test_parse_iso_reads_utc_and_offsets(text, epoch):
    assert units.parse_iso(text) == epoch


def test_iso_and_parse_iso_round_trip_to_the_millisecond():
    assert units.iso(1795435200.25) == "2026-11-23T12:00:00.250+00:00"
    assert units.parse_iso(units.iso(1795435200.25)) == 1795435200.25


@pytest.mark.parametrize(
    ("reply", "ms"),
    [((b"1700000000", b"999999"), 1700000000999), ((b"0", b"1000"), 1), ((5, 999), 5000)],
)
def test_ms_of_time_truncates_redis_time_to_whole_milliseconds(reply, ms):
    assert units.ms_of_time(*reply) == ms


@pytest.mark.parametrize(("interval_s", "ttl_ms"), [(60, 120_000), (0.5, 1000), (0.0004, 1), (1.2345, 2469)])
def test_heartbeat_ttl_is_twice_the_interval_in_ms(interval_s, ttl_ms):
    assert protocol.heartbeat_ttl_ms(interval_s) == ttl_ms


@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_release_script_code_maps_to_its_outcome(outcome):
    assert protocol.outcome_of(outcome.value.encode()) is outcome


@pytest.mark.parametrize("code", [b"", b"RELEASED", b"ok", b"\xff", b"released "])
def test_an_unknown_release_script_code_is_an_error(code):
    with pytest.raises(ReleaseError, match="release script answered"):
        protocol.outcome_of(code)


@pytest.mark.parametrize(
    ("gpu", "key", "channel"),
    [(0, b"gpu_lock:0", b"gpu_lock:gpu_lock:0"), ("a:b", b"gpu_lock:a:b", b"gpu_lock:gpu_lock:a:b")],
)
def test_lock_key_and_its_release_channel_follow_the_fleet_protocol(gpu, key, channel):
    assert protocol.lock_key(gpu) == key
    assert protocol.release_channel(key) == channel
    assert protocol.heartbeat_key(key) == key + b":heartbeat"


def test_lock_value_and_task_name_are_inverse():
    value = protocol.lock_value("tts_synthesize")
    assert value == b"locked_by_tts_synthesize"
    assert protocol.task_name(value) == b"tts_synthesize"


@pytest.mark.parametrize(
    ("text", "limit", "shown"),
    [
        ("gpu_lock:0", 48, "gpu_lock:0"),
        ("a\x1b[2Jb", 48, "a\\x1b[2Jb"),
        ("line\nbreak", 48, "line\\nbreak"),
        ("ünïcode", 48, "ünïcode"),
        ("x" * 60, 10, "x" * 9 + "…"),
    ],
)
def test_printable_escapes_control_characters_and_cuts(text, limit, shown):
    assert protocol.printable(text, limit) == shown
