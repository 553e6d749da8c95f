"""Verify-once caches for one node process: a bounded LRU of objects already verified, keyed by the
SHA-256 of what the client sent, each entry kept no longer than the object itself is valid.

What a cache answers is only the result of checks that never change for the same bytes (a signature,
a certificate chain to a key, a parsed claim set); whatever a revocation or rotation can change is read
from the configuration database on every request (rmsd.node: one small status query)."""

import hashlib
import threading
import time
from collections import OrderedDict
from typing import Any

DEFAULT_SIZE = 10_000


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class VerifiedCache:
    def __init__(self, name: str, size: int = DEFAULT_SIZE):
        self.name, self.size = name, size
        self._entries: OrderedDict[bytes, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: bytes) -> Any | None:
        """The value for `key` while it has not expired (wall clock, as the objects' own expiry is)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > time.time():
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None

    def put(self, key: bytes, value: Any, expires_at: float) -> None:
        """Keep `value` until `expires_at` (seconds since the epoch) at the latest."""
        if expires_at <= time.time():
            return
        with self._lock:
            self._entries[key] = (expires_at, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> str:
        total = self.hits + self.misses
        rate = f"{100 * self.hits / total:.1f}%" if total else "-"
        return f"{self.name} hits={self.hits} misses={self.misses} hit_rate={rate} size={len(self._entries)}"
