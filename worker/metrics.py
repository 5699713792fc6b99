"""The worker's Prometheus metrics: batches, compute, queue and stage time, versions, weight swaps.

The compute thread feeds the per-batch figures (``on_batch``) and the weight swaps
(``on_swap``); the socket thread refreshes the per-model gauges from the same
description it sends in its heartbeat (``refresh``). prometheus-client's metrics are
thread-safe, so the two threads and the HTTP thread need no lock of ours. A model's counters
start at 0 when it is first described (``refresh``), so dashboards read 0 rather than "No data".

The queue-wait histogram has one observation per request, so it is counted in plain lists, a
batch's waits under one lock (``BatchHistogram``), and made into a family only when a scrape asks:
observed one by one it cost the compute thread some 34 locked increments per batch of 32.
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class BatchHistogram:
    """A Prometheus histogram with one label, observed a batch of values at a time (one lock per
    batch), exported as the same family a ``Histogram`` would be (``_bucket``, ``_count``, ``_sum``)."""

    def __init__(self, name: str, documentation: str, label: str, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = tuple(float(b) for b in buckets)
        self._lock = threading.Lock()
        self._series: dict[str, tuple[list[int], list[float]]] = {}  # label -> (count per bucket, +Inf last; [sum])
        registry.register(self)

    def observe_many(self, key: str, values: Sequence[float]) -> None:
        """Observe every value (a value equal to a bound falls in that bound's bucket, as in Prometheus)."""
        bounds = self.bounds
        where, last, at = [], None, 0
        for v in values:  # a batch's waits come in runs of one value (one REQUEST's requests): one search a run
            if v != last:
                last, at = v, bisect_left(bounds, v)
            where.append(at)
        total = sum(values)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = ([0] * (len(bounds) + 1), [0.0])
            counts = series[0]
            for i in where:
                counts[i] += 1
            series[1][0] += total

    def describe(self) -> list:
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.label])]

    def collect(self) -> list:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            snapshot = [(key, list(counts), total[0]) for key, (counts, total) in self._series.items()]
        for key, counts, total in snapshot:
            cumulative, buckets = 0, []
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric([key], buckets, total)
        return [family]


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.batch_size = Histogram("ringserve_worker_batch_size", "Rows per batch run by the model", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.compute = Histogram("ringserve_worker_compute_duration_seconds", "Model time per batch", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue = BatchHistogram("ringserve_worker_queue_duration_seconds",
                                    "Arrival at the worker to the start of its batch", "model",
                                    LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("ringserve_worker_stage_duration_seconds",
                               "Time in a model's preprocess or postprocess stage, per request", ["model", "stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self._children: dict = {}  # (model, outcome) -> labelled counter: labels() costs a lock and a lookup
        self._batch_children: dict = {}  # model -> (batch size, compute) labelled histograms
        self.requests = Counter("ringserve_worker_requests", "Requests answered by this worker, by outcome",
                                ["model", "outcome"], registry=r)
        self.version = Gauge("ringserve_model_version", "Weights version served (0: weights from a file)",
                             ["model"], registry=r)
        self.ready = Gauge("ringserve_model_ready", "1 when the model has weights and serves", ["model"],
                           registry=r)
        self.swaps = Counter("ringserve_weight_swaps", "Weight versions swapped in", ["model"], registry=r)
        self.swap_duration = Histogram("ringserve_weight_swap_duration_seconds",
                                       "Time the compute thread spent swapping a version in", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.refused = Counter("ringserve_weight_refusals", "Weight versions refused (could not be loaded)",
                               ["model"], registry=r)
        self._refusals_seen: set[tuple[str, int]] = set()
        self._models_seen: set[str] = set()  # the worker's own --model names
        self.loads = Counter("ringserve_model_loads", "On-demand models loaded (first request, or after an eviction)",
                             ["model"], registry=r)
        self.evictions = Counter("ringserve_model_evictions", "On-demand models unloaded, least recently used first",
                                 ["model"], registry=r)  # bounded: one entry per refused version

    def on_batch(self, model: str, rows: int, queue_waits_s: list[float], compute_s: float) -> None:
        children = self._batch_children.get(model)
        if children is None:
            children = self._batch_children[model] = (self.batch_size.labels(model), self.compute.labels(model))
        children[0].observe(rows)
        children[1].observe(compute_s)
        self.queue.observe_many(model, queue_waits_s)

    def on_stage(self, model: str, stage: str, seconds: float) -> None:
        """One request's preprocess or postprocess time (the stage pool's threads call this)."""
        self.stage.labels(model, stage).observe(seconds)

    def on_answer(self, model: str, outcome: str) -> None:
        self.on_answers(model, outcome, 1)

    def on_answers(self, model: str, outcome: str, n: int) -> None:
        child = self._children.get((model, outcome))
        if child is None:
            child = self._children[(model, outcome)] = self.requests.labels(model, outcome)
        child.inc(n)

    def on_load(self, model: str) -> None:
        self.loads.labels(model).inc()

    def on_evict(self, model: str) -> None:
        self.evictions.labels(model).inc()

    def on_swap(self, model: str, seconds: float) -> None:
        self.swaps.labels(model).inc()
        self.swap_duration.labels(model).observe(seconds)

    def refresh(self, models: dict[str, dict]) -> None:
        """Per-model gauges from the heartbeat's description ({name: {"version", "ready", ...}});
        a refusal (reported there by the weight-sync thread) is counted once per version."""
        for name, info in models.items():
            if name not in self._models_seen:
                self._models_seen.add(name)
                self.on_answers(name, "ok", 0)
                for counter in (self.swaps, self.refused, self.loads, self.evictions):
                    counter.labels(name)
            self.version.labels(name).set(info.get("version") or 0)
            self.ready.labels(name).set(1 if info.get("ready", True) else 0)
            refused = info.get("refused")
            if refused and (name, refused["version"]) not in self._refusals_seen:
                self._refusals_seen.add((name, refused["version"]))
                self.refused.labels(name).inc()
