"""Work an anonymous client can make a node do, bounded before anyone is authenticated: a rate per client
address (token buckets) and a fixed number of slots for an expensive step (the key derivation that checks an
enrollment credential). Both refuse at once, never queue: a refused client is told when to try again."""

import ipaddress
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic

from rmsd.errors import TooManyRequestsError

MAX_SOURCES = 10_000  # client addresses remembered per process; the least recently seen are forgotten first


def source_key(address: str) -> str:
    """What one client is counted as: its IPv4 address, or its IPv6 /64 (a host usually holds a whole /64 and
    could otherwise take a new address for every request). Anything else as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class SourceLimiter:
    """A token bucket per client: `burst` requests at once, then one every `interval` seconds. Memory stays
    bounded whatever the number of clients: at most `max_sources` buckets (least recently used out; a
    forgotten client starts again with a full bucket)."""

    def __init__(self, burst: int, interval: float, what: str, max_sources: int = MAX_SOURCES):
        self.burst, self.interval, self.what, self.max_sources = burst, interval, what, max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when counted)
        self._lock = threading.Lock()

    def take(self, source: str) -> None:
        """Count one request of `source`; TooManyRequestsError, saying when to try again, when it has none
        left (a refused request costs it nothing)."""
        key = source_key(source)
        now = monotonic()
        with self._lock:
            tokens, counted = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - counted) / self.interval)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        if not allowed:
            wait = max(1, math.ceil((1.0 - tokens) * self.interval))
            raise TooManyRequestsError(
                f"too many {self.what} from this address ({self.burst} at once, then one every "
                f"{self.interval:g} seconds); try again in {wait} second(s)", retry_after=wait,
            )

    def __len__(self) -> int:
        return len(self._buckets)


class Slots:
    """At most `size` holders at a time, and no waiting for one: a request that finds them all taken is
    refused at once (429), so neither memory nor threads pile up behind the expensive step."""

    def __init__(self, size: int, what: str, retry_after: int = 1):
        self.size, self.what, self.retry_after = size, what, retry_after
        self._free = threading.BoundedSemaphore(size)

    @contextmanager
    def held(self) -> Iterator[None]:
        if not self._free.acquire(blocking=False):
            raise TooManyRequestsError(
                f"this node is busy with {self.what} ({self.size} at a time); try again in {self.retry_after} "
                "second(s)", retry_after=self.retry_after,
            )
        try:
            yield
        finally:
            self._free.release()
