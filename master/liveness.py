"""Heartbeat arithmetic (Paranoid Pirate / RFC 6): a peer silent for liveness x interval is dead."""
from __future__ import annotations

from typing import Mapping, TypeVar

K = TypeVar("K")


def expiry(interval_s: float, liveness: int) -> float:
    """Seconds of silence after which a peer is presumed dead."""
    return interval_s * liveness


def missed(last_seen: Mapping[K, float], now: float, interval_s: float, liveness: int) -> set[K]:
    """The peers whose last message is older than liveness x interval."""
    limit = expiry(interval_s, liveness)
    return {k for k, t in last_seen.items() if now - t > limit}


def heartbeat_due(last_sent: float, now: float, interval_s: float) -> bool:
    return now - last_sent >= interval_s
