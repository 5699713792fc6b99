"""Per-model request rate and latency over a recent window, for the admin status table.

Why here and not from Prometheus: `ringserve-admin status` must say how a model is doing now
without a metrics server. Cheap and bounded by construction: `record` (called once per answered
request, in Broker.finish) writes a few list slots; each model holds a fixed ring of its last
RING latencies and SPAN_S one-second answer counters; the number of models is capped. The
percentiles are computed only when status asks (a sort of at most RING numbers per model).
"""
from __future__ import annotations

import math
import time

RING = 1024  # latencies kept per model (the newest win)
SPAN_S = 60  # the window, seconds
MAX_MODELS = 4096  # models tracked at most (the broker records only models some worker serves)


class ModelWindow:
    """One model's recent answers: per-second counts (the rate) and a ring of ok latencies."""

    __slots__ = ("lat", "at", "n", "counts", "seconds", "first")

    def __init__(self) -> None:
        self.lat = [0.0] * RING
        self.at = [-math.inf] * RING
        self.n = 0  # latencies written so far (the ring's next slot is n % RING)
        self.counts = [0] * SPAN_S
        self.seconds = [-1] * SPAN_S  # which second each count belongs to
        self.first: float | None = None  # the first answer's time: the window is never longer than that

    def _count(self, now: float, answers: int) -> None:
        """`answers` final answers in the second of `now` (the rate's ring of per-second counts)."""
        if self.first is None:
            self.first = now
        sec = int(now)
        k = sec % SPAN_S
        if self.seconds[k] != sec:
            self.seconds[k], self.counts[k] = sec, 0
        self.counts[k] += answers

    def record(self, now: float, latency: float | None) -> None:
        """One final answer at `now`; `latency` for a result (None: an error, counted in the rate only)."""
        self._count(now, 1)
        if latency is not None:
            i = self.n % RING
            self.lat[i], self.at[i] = latency, now
            self.n += 1

    def record_all(self, now: float, latencies: list[float]) -> None:
        """`record(now, latency)` for each of `latencies` (a message's results answered together)."""
        self._count(now, len(latencies))
        lat, at, n = self.lat, self.at, self.n
        for latency in latencies:
            i = n % RING
            lat[i], at[i] = latency, now
            n += 1
        self.n = n

    def summary(self, now: float) -> dict:
        """{"rate_per_s", "p50_ms", "p99_ms"} over the last SPAN_S seconds (None when nothing to say)."""
        sec = int(now)
        answers = sum(c for c, s in zip(self.counts, self.seconds, strict=True) if sec - SPAN_S < s <= sec)
        span = min(float(SPAN_S), max(1.0, now - self.first)) if self.first is not None else float(SPAN_S)
        recent = sorted(x for x, t in zip(self.lat, self.at, strict=True) if now - t <= SPAN_S)
        return {"rate_per_s": round(answers / span, 3),
                "p50_ms": _ms(percentile(recent, 0.50)), "p99_ms": _ms(percentile(recent, 0.99))}


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list; None for an empty one."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


class Windows:
    """Every model's window (at most MAX_MODELS); the broker calls `record`, status `summary`."""

    def __init__(self) -> None:
        self.models: dict[str, ModelWindow] = {}

    def record(self, model: str, received: float, ok: bool, now: float | None = None) -> None:
        """A request received at monotonic `received` got its final answer at `now` (default: now)."""
        w = self.models.get(model)
        if w is None:
            if len(self.models) >= MAX_MODELS:
                return
            w = self.models[model] = ModelWindow()
        if now is None:
            now = time.monotonic()
        w.record(now, now - received if ok else None)

    def summary(self, model: str, now: float) -> dict:
        w = self.models.get(model)
        return w.summary(now) if w is not None else {"rate_per_s": 0.0, "p50_ms": None, "p99_ms": None}
