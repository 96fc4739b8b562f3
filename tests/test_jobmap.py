"""JobMap: dcgm-exporter's job-mapping files (--hpc-job-mapping-dir), written atomically and only on change."""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from pathlib import Path

import pytest

from monitor import jobmap
from monitor.jobmap import MAX_JOB_CHARS, JobMap


def read_like_dcgm_exporter(directory: Path) -> dict[str, list[str]]:
    """What dcgm-exporter's hpc mapper makes of the directory: files named <gpu> or <gpu>.<instance>
    (others and directories skipped), one job id a line (a trailing \\r dropped)."""
    jobs: dict[str, list[str]] = {}
    for entry in directory.iterdir():
        if entry.is_dir() or not re.fullmatch(r"^\d+(\.\d+)?$", entry.name):
            continue
        jobs[entry.name] = [line.removesuffix("\r") for line in entry.read_text().split("\n")[:-1]]
    return jobs


def test_one_file_per_gpu_one_job_a_line(tmp_path):
    JobMap(tmp_path).write({"0": "tts_synthesize#9b1e", "1": None, "2.0": "asr"})
    assert read_like_dcgm_exporter(tmp_path) == {"0": ["tts_synthesize#9b1e"], "1": [], "2.0": ["asr"]}
    assert (tmp_path / "0").read_bytes() == b"tts_synthesize#9b1e\n"
    assert (tmp_path / "1").read_bytes() == b""  # no holder: an empty file, no label
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2.0"]  # no temporary file left
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_files_are_world_readable_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        JobMap(tmp_path).write({"0": "tts"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "0").stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("holder", "line"),
    [
        ("tts\nasr", "tts\\nasr"),  # one line: a second job would be a second label
        ("tts\r", "tts"),
        ("  tts  ", "tts"),
        ("a\x1b[31mred", "a\\x1b[31mred"),  # no escape sequence reaches a reader raw
        ("\u00e9t\u00e9", "\u00e9t\u00e9"),  # printable UTF-8 is kept
        ("x" * 1000, "x" * (MAX_JOB_CHARS - 1) + "\u2026"),
        ("   ", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_holder_names_are_one_printable_bounded_line(tmp_path, holder, line):
    JobMap(tmp_path).write({"0": holder})
    content = (tmp_path / "0").read_text()
    assert content == (f"{line}\n" if line else "")
    assert len(line) <= MAX_JOB_CHARS
    assert line.isprintable()


@pytest.mark.parametrize(
    "gpu", ["GPU-5f0c1b2a-1111-2222-3333-444455556666", "a", "", "1.", ".1", "0/../x", "-1", "1.2.3"]
)
def test_a_gpu_id_dcgm_exporter_would_not_read_is_refused_before_anything_is_written(tmp_path, gpu):
    with pytest.raises(ValueError, match="GPU id"):
        JobMap(tmp_path).write({"0": "tts", gpu: "asr"})
    assert list(tmp_path.iterdir()) == []


def test_unchanged_content_is_not_rewritten(tmp_path):
    jobs = JobMap(tmp_path)
    jobs.write({"0": "tts", "1": None})
    before = {name: (tmp_path / name).stat() for name in ("0", "1")}
    # Another JobMap (a restarted monitor) reads what is there, not what it remembers.
    for writer in (jobs, JobMap(tmp_path)):
        writer.write({"0": "tts", "1": None})
        for name, old in before.items():
            now = (tmp_path / name).stat()
            assert (now.st_ino, now.st_mtime_ns) == (old.st_ino, old.st_mtime_ns)
    jobs.write({"0": "asr", "1": None})
    assert (tmp_path / "0").stat().st_ino != before["0"].st_ino  # replaced, not written in place
    assert (tmp_path / "1").stat().st_ino == before["1"].st_ino
    # Content that only starts like the wanted one is rewritten.
    (tmp_path / "1").write_text("\nextra")
    jobs.write({"0": "asr", "1": None})
    assert (tmp_path / "1").read_bytes() == b""


def test_each_write_goes_through_a_temporary_file_renamed_over_the_old(tmp_path, monkeypatch):
    seen: list[tuple[Path, Path, bytes, bytes]] = []
    real_replace = os.replace

    def replace(src: str, dst: Path) -> None:
        # At the rename, the temporary file is complete and the old file still whole.
        seen.append((Path(src), Path(dst), Path(src).read_bytes(), Path(dst).read_bytes()))
        real_replace(src, dst)

    jobs = JobMap(tmp_path)
    jobs.write({"0": "old"})
    monkeypatch.setattr(jobmap.os, "replace", replace)
    jobs.write({"0": "new"})
    ((src, dst, temp_content, old_content),) = seen
    assert src.parent == tmp_path  # the same directory: rename(2) is atomic there
    assert src.name.startswith(".gpulock-")
    assert not re.fullmatch(r"^\d+(\.\d+)?$", src.name)  # dcgm-exporter skips it
    assert dst == tmp_path / "0"
    assert (temp_content, old_content) == (b"new\n", b"old\n")


def test_a_concurrent_reader_never_sees_a_partial_file(tmp_path):
    jobs = JobMap(tmp_path)
    a, b = "a" * MAX_JOB_CHARS, "b" * (MAX_JOB_CHARS - 10)
    jobs.write({"0": a})
    whole = {f"{a}\n", f"{b}\n"}
    stop = threading.Event()
    bad: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            content = (tmp_path / "0").read_text()
            reads += 1
            if content not in whole:
                bad.append(content)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(400):
            jobs.write({"0": b if i % 2 else a})
    finally:
        stop.set()
        thread.join()
    assert reads > 0
    assert bad == []


def test_a_gpu_no_longer_named_is_emptied_and_other_files_are_left_alone(tmp_path):
    (tmp_path / "7").write_text("slurm-job-1\n")  # somebody else's
    jobs = JobMap(tmp_path)
    jobs.write({"0": "tts", "1": "asr"})
    jobs.write({"1": "asr"})
    assert read_like_dcgm_exporter(tmp_path) == {"0": [], "1": ["asr"], "7": ["slurm-job-1"]}
    jobs.write({"1": None})
    jobs.write({})
    assert read_like_dcgm_exporter(tmp_path) == {"0": [], "1": [], "7": ["slurm-job-1"]}
    jobs.write({"2": "x"})
    jobs.clear()
    assert read_like_dcgm_exporter(tmp_path) == {"0": [], "1": [], "2": [], "7": ["slurm-job-1"]}


def test_a_missing_directory_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        JobMap(tmp_path / "absent").write({"0": "tts"})


def test_an_unwritable_directory_raises_oserror_and_leaves_nothing(tmp_path, monkeypatch):
    def refused(**kwargs: object) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied", str(kwargs["dir"]))

    # As root, a 0555 directory is still writable: the refusal mkstemp meets is made here.
    monkeypatch.setattr(jobmap.tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError):
        JobMap(tmp_path).write({"0": "tts"})
    assert list(tmp_path.iterdir()) == []


def test_a_failing_gpu_does_not_stop_the_others_and_the_first_error_is_raised(tmp_path, monkeypatch):
    (tmp_path / "1").mkdir()  # not a file: cannot be read or replaced
    jobs = JobMap(tmp_path)
    with pytest.raises(IsADirectoryError):
        jobs.write({"0": "a", "1": "b", "2": "c"})
    assert read_like_dcgm_exporter(tmp_path) == {"0": ["a"], "2": ["c"]}
    # A failed rename leaves no temporary file behind, and the GPU is tried again next time.
    (tmp_path / "1").rmdir()

    def failing(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(jobmap.os, "replace", failing)
    with pytest.raises(OSError, match="I/O error"):
        jobs.write({"0": "a", "1": "b", "2": "c"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "2"]
    monkeypatch.undo()
    jobs.write({"0": "a", "2": "c"})  # "1" was never filled: not emptied either
    assert not (tmp_path / "1").exists()
