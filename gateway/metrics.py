"""The gateway's Prometheus metrics, named as Triton's users expect, plus ringserve's own.

Triton's names (``nv_inference_request_success``/``_failure``, ``nv_inference_count``,
``nv_inference_request_duration_us``) so existing dashboards work; a ringserve histogram of
the total latency by model. The master does not report queue and compute time per request, so
only the total is measured here. Labels are bounded: a model label is a name the master lists
(anything else is ``_unknown``), a version one the reply carried.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

MAX_CHILDREN = 4096
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.success = Counter("nv_inference_request_success", "Successful inference requests",
                               ["model", "version"], registry=r)
        self.failure = Counter("nv_inference_request_failure", "Failed inference requests",
                               ["model", "version", "reason"], registry=r)
        self.count = Counter("nv_inference_count", "Inferences performed (rows of the first dimension)",
                             ["model", "version"], registry=r)
        self.duration_us = Counter("nv_inference_request_duration_us",
                                   "Cumulative end-to-end inference request time (microseconds)",
                                   ["model", "version"], registry=r)
        self.requests = Counter("ringserve_gateway_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "code"], registry=r)
        self.latency = Histogram("ringserve_gateway_request_seconds", "Inference request time at the gateway",
                                 ["model"], buckets=BUCKETS, registry=r)

        self._children: dict[tuple, tuple] = {}  # label lookups cost more than the increments: kept
        self._endpoint: dict[tuple, Counter] = {}

    def infer_done(self, model: str, version: str, seconds: float, rows: int, reason: str | None) -> None:
        key = (model, version)
        c = self._children.get(key)
        if c is None:
            if len(self._children) > MAX_CHILDREN:
                self._children.clear()
            c = self._children[key] = (self.success.labels(model, version), self.count.labels(model, version),
                                       self.duration_us.labels(model, version), self.latency.labels(model))
        if reason is None:
            c[0].inc()
            c[1].inc(rows)
        else:
            self.failure.labels(model, version, reason).inc()
        c[2].inc(seconds * 1e6)
        c[3].observe(seconds)

    def request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        c = self._endpoint.get(key)
        if c is None:
            c = self._endpoint[key] = self.requests.labels(endpoint, str(status))
        c.inc()
