"""Per-client token buckets: a pure function of the key, the clock and the settings.

The key is the client's authenticated User-Id (with --keys) or its connection identity
(without). The table is bounded: past `max_keys` the least recently seen client is forgotten,
which only ever gives it a fresh (full) bucket, never less.
"""
from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    def __init__(self, rate: float, burst: float | None = None, max_keys: int = 10_000):
        if rate <= 0:
            raise ValueError("rate must be > 0 requests per second")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        self.max_keys = max_keys
        self._buckets: OrderedDict[bytes | str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: bytes | str, now: float) -> float:
        """Spend one token: 0.0 when allowed, else the seconds until the next token (retry-after)."""
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
