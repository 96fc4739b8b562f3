"""The daemon's allocator settings (monitor/allocator.py): glibc only, never over the operator's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from monitor import allocator


class FakeLibc:
    def __init__(self) -> None:
        self.set: list[tuple[int, int]] = []
        self.trimmed = 0

    def mallopt(self, param: int, value: int) -> int:
        self.set.append((param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.trimmed += 1
        return 1


def test_each_setting_is_made_unless_the_environment_makes_it():
    libc = FakeLibc()
    done = allocator.tune({"MALLOC_ARENA_MAX": "4"}, libc=lambda: libc)  # type: ignore[arg-type,return-value]
    assert done == ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
    assert libc.set == [(allocator.M_MMAP_THRESHOLD, 128 * 1024), (allocator.M_TRIM_THRESHOLD, 128 * 1024)]


def test_glibc_tunables_for_malloc_leave_every_setting_to_the_operator():
    libc = FakeLibc()
    tunables = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=8"}
    assert allocator.tune(tunables, libc=lambda: libc) == []  # type: ignore[arg-type,return-value]
    assert libc.set == []


def test_another_c_library_is_left_alone():
    assert allocator.tune({}, libc=lambda: None) == []
    assert allocator.trim(libc=lambda: None) is False


@pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"), reason="glibc only")
def test_glibc_takes_every_setting_and_a_trim():
    code = "from monitor import allocator; print(allocator.tune({}), allocator.trim())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['MALLOC_ARENA_MAX', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_'] True"
