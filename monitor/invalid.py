"""Keys under the lock pattern that are not locks (a hash, a list...): audited one by one up to
SHOWN of them, the rest summed up in one event, and remembered in Redis, so that 100,000 junk
keys are neither 100,000 audit lines nor said again at every start."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from monitor import protocol

SHOWN = 20  # invalid keys audited one by one; beyond, one event counts the rest
SAID_KEY = protocol.MONITOR_PREFIX + b"invalid_locks"
SAID_TTL_MS = 7 * 86_400_000


@dataclass(frozen=True)
class Said:
    """What the audit already holds about invalid keys."""

    keys: frozenset[str] = frozenset()  # digests of the keys audited one by one
    summed_up: int = 0  # how many others the last summary counted

    def dumps(self) -> bytes:
        return json.dumps({"keys": sorted(self.keys), "summed_up": self.summed_up}).encode()

    @classmethod
    def loads(cls, raw: bytes | None) -> Said:
        try:
            data = json.loads(raw) if raw is not None else {}
            return cls(frozenset(str(k) for k in data.get("keys", [])), int(data.get("summed_up", 0)))
        except (ValueError, TypeError, AttributeError):
            return cls()


def digest(key: bytes) -> str:
    return hashlib.sha1(key, usedforsecurity=False).hexdigest()


def to_say(said: Said, invalid: Mapping[bytes, str]) -> tuple[Said, list[bytes], int | None]:
    """Given the invalid keys of a pass (key -> why), what to audit now: the keys to name one by
    one, and the count of the others when it changed (None: no summary). Pure."""
    present = {digest(key): key for key in invalid}
    kept = said.keys & present.keys()  # a key that went is forgotten: back, it is news again
    new = [key for d, key in present.items() if d not in kept][: max(0, SHOWN - len(kept))]
    kept |= {digest(key) for key in new}
    others = len(present) - len(kept)
    summary = others if others != said.summed_up and others > 0 else None
    return Said(frozenset(kept), others), new, summary
