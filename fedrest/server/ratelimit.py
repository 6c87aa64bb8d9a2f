"""Token-bucket rate limits per key (a node, a client address), in memory and bounded.

A key may make ``burst`` requests at once and ``rate`` per second on average. A refused request is told
how long to wait (the HTTP answer is 429 with ``Retry-After``). At most ``max_keys`` buckets are kept; the
least recently used one is forgotten first (it comes back full), so an attacker cycling keys costs memory
no more than ``max_keys`` buckets.

Kept in-process on purpose: the per-node key is known only after authentication, the coordinator is one
process, and the limiter must answer in the coordinator's JSON error shape.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Callable


class RateLimiter:
    """Token buckets of capacity ``burst`` refilled at ``rate`` tokens per second, one per key.

    Parameters
    ----------
    rate : tokens per second (> 0).
    burst : bucket capacity (>= 1 request).
    clock : monotonic clock in seconds (tests pass a fake one).
    max_keys : buckets kept at most (least recently used evicted).
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        if not (rate > 0 and burst >= 1 and max_keys >= 1):
            raise ValueError(f"need rate > 0, burst >= 1, max_keys >= 1; got {rate}, {burst}, {max_keys}")
        self.rate, self.burst, self.max_keys = float(rate), float(burst), max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, time)

    def acquire(self, key: str) -> float:
        """Take one token for ``key``: returns 0.0 when the request may go on, else the seconds to wait."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(wait: float) -> str:
    """``Retry-After`` value for a wait in seconds: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(wait)))
