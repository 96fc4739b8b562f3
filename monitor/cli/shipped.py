"""Files of the repository that an installed wheel carries too, for `config example` and `deploy`.

The package keeps copies under `monitor/data/`; `tests/test_shipped.py` holds each byte for byte equal
to the repository's file (`REPO_PATHS`), so the two cannot drift.
"""

from __future__ import annotations

from importlib import resources

# The copy's name under monitor/data/ -> the file in the repository it copies.
REPO_PATHS = {
    "monitor.yml": "monitor.yml",
    "gpulock-monitor.service": "deploy/systemd/gpulock-monitor.service",
    "redis-acl.conf": "deploy/redis-acl.conf",
    "redis-acl-7.conf": "deploy/redis-acl-7.conf",
}


def read(name: str) -> bytes:
    """The package's copy of a shipped file."""
    if name not in REPO_PATHS:
        raise KeyError(name)
    return resources.files("monitor").joinpath("data").joinpath(name).read_bytes()
