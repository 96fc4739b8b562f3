"""Each GPU's current lock holder, written where dcgm-exporter labels that GPU's series with it.

dcgm-exporter's `--hpc-job-mapping-dir` (env `DCGM_HPC_JOB_MAPPING_DIR`) names a directory that it
reads at every scrape (NVIDIA/dcgm-exporter, internal/pkg/transformation/hpc.go):
- a file per GPU, named by the GPU's id as dcgm-exporter's `gpu` label has it (DCGM's GPU index, "0",
  "1", ...), or `<gpu>.<GPU instance id>` for a MIG instance ("2.0"); other names are skipped (a
  UUID file name is ignored), as are directories;
- each line of a file is one job id (bufio.Scanner: split at "\\n", a trailing "\\r" dropped), and
  each job id gives a copy of every series of that GPU with the label `hpc_job="<job id>"`;
- a GPU whose file is absent or empty keeps its series unlabelled. This module writes an EMPTY file
  for a GPU with no holder (never removes one): the same to dcgm-exporter, and the file stays there
  for an operator to see which GPUs the monitor manages.

How it writes: only a file whose content changes, through a temporary file in the same directory
(named ".gpulock-*.tmp", which dcgm-exporter skips) renamed over the old one, so a scrape reads the
old or the new content, never a part. Files are made world-readable (0644), whatever the umask:
dcgm-exporter often runs as another user or in a container. Not fsynced: the content is rewritten
whenever it differs from what a holder needs, so a file a crash left empty or stale is put right by
the next write.

Holder names are data from Redis: each is cut to one printable line of at most MAX_JOB_CHARS
(control characters escaped). The directory must exist and be writable (under the systemd unit's
ProtectSystem=strict it needs ReadWritePaths=); when it is not, `write` raises the OSError, after
still trying the other GPUs: the caller audits it and carries on.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from monitor import protocol

# dcgm-exporter's own pattern for the names of mapping files (hpc.go, validGPUFile).
GPU_FILE = re.compile(r"\d+(\.\d+)?")
MAX_JOB_CHARS = 128
FILE_MODE = 0o644
TEMP_PREFIX = ".gpulock-"


def job_line(holder: str | None) -> str:
    """The file's content for a GPU held by `holder`: its sanitised name and a newline; "" for none
    (no holder, or a name of nothing but white space)."""
    if holder is None:
        return ""
    name = protocol.printable(holder.strip(), MAX_JOB_CHARS).strip()
    return f"{name}\n" if name else ""


class JobMap:
    """The job-mapping files of the GPUs this monitor is given, in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._written: set[str] = set()  # GPUs whose file this JobMap last left non-empty

    def write(self, holders: Mapping[str, str | None]) -> None:
        """Make each named GPU's file name its holder (None: no holder, an empty file). A GPU whose file
        this JobMap filled earlier and that `holders` no longer names is emptied; files of GPUs never
        named are left alone. Raises ValueError, before writing anything, for a GPU id that is not a
        dcgm-exporter file name, and the first OSError after trying every GPU."""
        for gpu in holders:
            if not GPU_FILE.fullmatch(gpu):
                raise ValueError(f"GPU id {gpu!r}: dcgm-exporter reads files named <index> or <index>.<instance>")
        wanted = {gpu: job_line(holder) for gpu, holder in holders.items()}
        for gpu in self._written - wanted.keys():
            wanted[gpu] = ""
        error: OSError | None = None
        for gpu, content in sorted(wanted.items()):
            try:
                self._write_file(gpu, content.encode())
            except OSError as exc:
                error = error or exc
                continue
            if content:
                self._written.add(gpu)
            else:
                self._written.discard(gpu)
        if error is not None:
            raise error

    def clear(self) -> None:
        """Empty every file this JobMap filled (the monitor stops: it no longer knows the holders)."""
        self.write({})

    def _write_file(self, gpu: str, data: bytes) -> bool:
        """Replace the GPU's file with `data` unless it holds exactly that; True when rewritten."""
        path = self.directory / gpu
        try:
            with path.open("rb") as current:
                if current.read(len(data) + 1) == data:
                    return False
        except FileNotFoundError:
            pass
        fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                os.fchmod(out.fileno(), FILE_MODE)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return True
