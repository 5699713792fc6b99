"""The gateway's Prometheus metrics, named as Triton's users expect, plus ringserve's own.

Triton's names (``nv_inference_request_success``/``_failure``, ``nv_inference_count``,
``nv_inference_request_duration_us``) so existing dashboards work; a ringserve histogram of
the total latency by model. The master does not report queue and compute time per request, so
only the total is measured here. Labels are bounded: a model label is a name the master lists
(anything else is ``_unknown``), a version one the reply carried; past MAX_CHILDREN label sets,
new ones are counted under ``_overflow``.

Counting is plain arithmetic under one lock per request (the HTTP loop and the gRPC thread both
count), and the families are built when Prometheus scrapes: prometheus_client's own counters
took a lock and several calls per increment, six increments a request, which cost the gateway
more than its tensor handling.
"""
from __future__ import annotations

import bisect
import threading

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

MAX_CHILDREN = 4096
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_OVERFLOW = "_overflow"


class _Infer:
    """One (model, version)'s figures."""

    __slots__ = ("success", "rows", "duration_us", "buckets", "seconds")

    def __init__(self) -> None:
        self.success = self.rows = 0
        self.duration_us = self.seconds = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one: above every bound (+Inf)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._infer: dict[tuple[str, str], _Infer] = {}
        self._failure: dict[tuple[str, str, str], int] = {}
        self._requests: dict[tuple[str, int], int] = {}
        self.registry.register(self)

    def _child(self, key: tuple[str, str]) -> tuple[tuple[str, str], "_Infer"]:
        """The counters of (model, version), or the overflow child past MAX_CHILDREN (held lock)."""
        c = self._infer.get(key)
        if c is None:
            if len(self._infer) >= MAX_CHILDREN:
                key = (_OVERFLOW, _OVERFLOW)
            c = self._infer.get(key) or self._infer.setdefault(key, _Infer())
        return key, c

    def infer_done(self, model: str, version: str, seconds: float, rows: int, reason: str | None) -> None:
        key = (model, version)
        with self._lock:
            key, c = self._child(key)
            if reason is None:
                c.success += 1
                c.rows += rows
            else:
                fkey = (*key, reason)
                if fkey not in self._failure and len(self._failure) >= MAX_CHILDREN:
                    fkey = (_OVERFLOW, _OVERFLOW, _OVERFLOW)
                self._failure[fkey] = self._failure.get(fkey, 0) + 1
            c.duration_us += seconds * 1e6
            c.seconds += seconds
            c.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1

    def infer_answered(self, model: str, version: str, seconds: float, rows: int, endpoint: str) -> None:
        """A successful inference and its request's 200, counted under one lock (the common case)."""
        key = (model, version)
        rkey = (endpoint, 200)
        with self._lock:
            key, c = self._child(key)
            c.success += 1
            c.rows += rows
            c.duration_us += seconds * 1e6
            c.seconds += seconds
            c.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
            n = self._requests.get(rkey)
            if n is None and len(self._requests) >= MAX_CHILDREN:
                rkey = (_OVERFLOW, 0)
                n = self._requests.get(rkey)
            self._requests[rkey] = (n or 0) + 1

    def request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        with self._lock:
            if key not in self._requests and len(self._requests) >= MAX_CHILDREN:
                key = (_OVERFLOW, 0)
            self._requests[key] = self._requests.get(key, 0) + 1

    # --------------------------------------------------------------- scrape
    def collect(self):
        """The families, from a copy taken under the lock (a scrape never holds it for long)."""
        with self._lock:
            infer = [(k, c.success, c.rows, c.duration_us, list(c.buckets), c.seconds) for k, c in self._infer.items()]
            failure = dict(self._failure)
            requests = dict(self._requests)
        success = CounterMetricFamily("nv_inference_request_success", "Successful inference requests",
                                      labels=["model", "version"])
        fail = CounterMetricFamily("nv_inference_request_failure", "Failed inference requests",
                                   labels=["model", "version", "reason"])
        count = CounterMetricFamily("nv_inference_count", "Inferences performed (rows of the first dimension)",
                                    labels=["model", "version"])
        duration = CounterMetricFamily("nv_inference_request_duration_us",
                                       "Cumulative end-to-end inference request time (microseconds)",
                                       labels=["model", "version"])
        latency = HistogramMetricFamily("ringserve_gateway_request_seconds", "Inference request time at the gateway",
                                        labels=["model"])
        by_model: dict[str, tuple[list[int], float]] = {}
        for (model, version), ok, rows, us, buckets, seconds in infer:
            success.add_metric([model, version], ok)
            count.add_metric([model, version], rows)
            duration.add_metric([model, version], us)
            acc = by_model.get(model)
            if acc is None:
                by_model[model] = (buckets, seconds)
            else:
                by_model[model] = ([a + b for a, b in zip(acc[0], buckets, strict=True)], acc[1] + seconds)
        for model, (buckets, seconds) in by_model.items():
            cumulative, total = [], 0
            for bound, n in zip([*map(_bound, BUCKETS), "+Inf"], buckets, strict=True):
                total += n
                cumulative.append((bound, total))
            latency.add_metric([model], cumulative, seconds)
        for labels, n in failure.items():
            fail.add_metric(list(labels), n)
        requests_family = CounterMetricFamily("ringserve_gateway_requests", "HTTP requests by endpoint and status",
                                              labels=["endpoint", "code"])
        for (endpoint, status), n in requests.items():
            requests_family.add_metric([endpoint, str(status)], n)
        return [success, fail, count, duration, latency, requests_family]


def _bound(b: float) -> str:
    return repr(float(b))
