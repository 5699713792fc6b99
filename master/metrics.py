"""The master's Prometheus metrics, named after Triton's and Ray Serve's habits.

Counters and histograms are fed by the event loop at the protocol events that change them
(``on_answer``, ``on_dispatch``, ...); gauges are refreshed from the loop's books by
``refresh`` at most a few times a second, so the HTTP thread never reads the loop's dicts.
The per-request series (answers by outcome, request and queue durations, cache lookups) are
counted in plain dicts and lists by the loop (``LocalCounts``) and turned into Prometheus
families only when a scrape asks (``collect``): a prometheus_client ``inc``/``observe`` takes a
lock and costs several microseconds, three of them per request were a fifth of the master's CPU.
Counters whose labels are known in advance (eviction reasons) start at 0, and a model's
counters start at 0 when it is first served, so a dashboard shows 0, not "No data", until
the first event (Prometheus's `increase()` also needs the 0 sample to count the first one).
"""
from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Why the broker evicts a worker (master/broker.py's evict calls): each series exists from the start.
EVICTION_REASONS = ("heartbeat_expired", "send_failed", "bad_message", "worker_disconnected", "re_registered",
                    "key_revoked")


class MasterMetrics:
    def __init__(self, policy: str) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes
        self.local = LocalCounts()
        r.register(self.local)  # ringserve_requests, *_duration_seconds, ringserve_response_cache_lookups
        self.queue_depth = Gauge("ringserve_queue_depth", "Requests waiting for a worker", ["model"], registry=r)
        self.in_flight = Gauge("ringserve_worker_in_flight", "Requests sent to a worker and not yet answered",
                               ["worker"], registry=r)
        self.workers = Gauge("ringserve_workers", "Registered workers by state", ["state"], registry=r)
        self.evictions = Counter("ringserve_worker_evictions", "Workers evicted, by reason", ["reason"], registry=r)
        self.retries = Counter("ringserve_retries", "Requests re-queued after their worker was lost", ["model"],
                               registry=r)
        self.late_replies = Counter("ringserve_late_replies", "Replies dropped: not the request's current attempt",
                                    registry=r)
        self.shadow = Counter("ringserve_shadow_requests", "Shadow copies by model, version and outcome "
                              "(answers discarded; 'dropped' when they could not be queued)",
                              ["model", "version", "outcome"], registry=r)
        self.cache_bytes = Gauge("ringserve_response_cache_bytes", "Bytes held by the response cache", registry=r)
        self.cache_evictions = Gauge("ringserve_response_cache_evictions", "Entries the response cache dropped "
                                     "to stay within its bound (since start)", registry=r)
        policy_info = Gauge("ringserve_dispatch_policy_info", "The master's scheduling policy", ["policy"],
                            registry=r)
        policy_info.labels(policy).set(1)
        # autoscaling (master/autoscale.py): what an HPA follows (deploy/autoscale)
        self.desired_workers = Gauge("ringserve_desired_workers", "Workers the autoscale policy wants for the "
                                     "model (target ongoing requests per worker, with delays)", ["model"], registry=r)
        self.ongoing_per_worker = Gauge("ringserve_ongoing_requests_per_worker", "Queued plus in-flight requests "
                                        "of the model per worker serving it", ["model"], registry=r)
        self._labels: dict[str, set] = {"queue": set(), "worker": set(), "desired": set(), "ongoing": set()}
        self._models_seen: set[str] = set()  # bounded like the books: only models some worker serves
        for reason in EVICTION_REASONS:
            self.evictions.labels(reason)

    # ------------------------------------------------------------ events
    def on_answer(self, model: str, version, outcome: str, seconds: float) -> None:
        local = self.local
        key = (model, version, outcome)
        answers = local.answers
        answers[key] = answers.get(key, 0) + 1
        h = local.request_duration.get(model)
        if h is None:
            h = local.request_duration[model] = Buckets()
        h.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        h.sum += seconds

    def on_answers(self, model: str, version, outcome: str, seconds: list[float]) -> None:
        """`on_answer` for several answers of one message that share model, version and outcome: one
        counter update for all of them, each duration still observed in its own bucket."""
        local = self.local
        key = (model, version, outcome)
        answers = local.answers
        answers[key] = answers.get(key, 0) + len(seconds)
        h = local.request_duration.get(model)
        if h is None:
            h = local.request_duration[model] = Buckets()
        counts = h.counts
        for s in seconds:
            counts[bisect_left(LATENCY_BUCKETS, s)] += 1
        h.sum += sum(seconds)

    def on_dispatches(self, model: str, waited: list[float]) -> None:
        """`on_dispatch` for several requests of one model dispatched together."""
        h = self.local.queue_duration.get(model)
        if h is None:
            h = self.local.queue_duration[model] = Buckets()
        counts = h.counts
        for s in waited:
            counts[bisect_left(LATENCY_BUCKETS, s)] += 1
        h.sum += sum(waited)

    def on_cache(self, model: str, hit: bool) -> None:
        key = (model, "hit" if hit else "miss")
        lookups = self.local.cache
        lookups[key] = lookups.get(key, 0) + 1

    def on_shadow(self, model: str, version, outcome: str) -> None:
        self.shadow.labels(model, str(version), outcome).inc()

    def on_dispatch(self, model: str, waited_s: float) -> None:
        h = self.local.queue_duration.get(model)
        if h is None:
            h = self.local.queue_duration[model] = Buckets()
        h.counts[bisect_left(LATENCY_BUCKETS, waited_s)] += 1
        h.sum += waited_s

    def on_evict(self, reason: str) -> None:
        self.evictions.labels(reason).inc()

    def on_retry(self, model: str) -> None:
        self.retries.labels(model).inc()

    def on_late_reply(self) -> None:
        self.late_replies.inc()

    # ------------------------------------------------------------ gauges
    def refresh(self, queue_depths: dict[str, int], in_flight: dict[str, int], states: dict[str, int]) -> None:
        """Set the gauges from plain dicts the loop built; labels that vanished are removed."""
        for model in queue_depths.keys() - self._models_seen:  # a newly served model: its counters at 0
            self._models_seen.add(model)
            self.retries.labels(model)
        _set_all(self.queue_depth, queue_depths, self._labels, "queue")
        _set_all(self.in_flight, in_flight, self._labels, "worker")
        for state in ("ready", "draining"):
            self.workers.labels(state).set(states.get(state, 0))


    def refresh_autoscale(self, desired: dict[str, int], per_worker: dict[str, float]) -> None:
        _set_all(self.desired_workers, desired, self._labels, "desired")
        _set_all(self.ongoing_per_worker, per_worker, self._labels, "ongoing")


def _set_all(gauge: Gauge, values: dict[str, int] | dict[str, float], seen: dict[str, set], key: str) -> None:
    for label, value in values.items():
        gauge.labels(label).set(value)
    for gone in seen[key] - set(values):
        gauge.remove(gone)
    seen[key] = set(values)


class Buckets:
    """One histogram series counted by the loop: per-bucket counts (not cumulative; the last is +Inf)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0


_BOUNDS = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]


def _snapshot(d: dict) -> list:
    """list(d.items()) from the scrape thread. It is one C call, but a garbage collection inside it
    can run Python code and let the loop add a key; a second try then gets a whole copy."""
    for _ in range(3):
        try:
            return list(d.items())
        except RuntimeError:  # dictionary changed size during iteration
            continue
    return []


class LocalCounts:
    """The per-request series, counted by the loop in plain dicts (no lock, no label lookup) and made
    into Prometheus families when a scrape calls `collect` in the HTTP thread. That thread only
    copies (`_snapshot`: list() of a dict is one C call under the GIL, tried again in the rare case
    a collection inside it let the loop add a key): it never walks a dict the loop changes. Bounded like the books: the broker counts only models some worker
    serves (other names are one label), versions are ints a worker announced."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, int | None, str], int] = {}  # (model, version, outcome) -> answers
        self.request_duration: dict[str, Buckets] = {}
        self.queue_duration: dict[str, Buckets] = {}
        self.cache: dict[tuple[str, str], int] = {}  # (model, hit|miss) -> lookups

    def describe(self):
        return self._families(empty=True)

    def collect(self):
        return self._families(empty=False)

    def _families(self, empty: bool) -> list:
        requests = CounterMetricFamily("ringserve_requests", "Requests answered, by model, version and outcome "
                                       "(ok or the error code)", labels=["model", "version", "outcome"])
        cache = CounterMetricFamily("ringserve_response_cache_lookups", "Response cache lookups by model and "
                                    "result (hit: answered by the master, no worker)", labels=["model", "result"])
        total = HistogramMetricFamily("ringserve_request_duration_seconds", "Arrival to final answer",
                                      labels=["model"])
        queued = HistogramMetricFamily("ringserve_queue_duration_seconds", "Arrival to dispatch to a worker",
                                       labels=["model"])
        if not empty:
            for (model, version, outcome), n in _snapshot(self.answers):
                requests.add_metric([model, "" if version is None else str(version), outcome], n)
            for labels, n in _snapshot(self.cache):
                cache.add_metric(list(labels), n)
            for family, series in ((total, self.request_duration), (queued, self.queue_duration)):
                for model, h in _snapshot(series):
                    counts, acc, buckets = list(h.counts), 0, []
                    for bound, n in zip(_BOUNDS, counts, strict=True):
                        acc += n
                        buckets.append((bound, acc))
                    family.add_metric([model], buckets, h.sum)
        return [requests, total, queued, cache]
