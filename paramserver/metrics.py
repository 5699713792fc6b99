"""A shard's Prometheus metrics: versions and bytes held, stage/commit outcomes and times, fetches.

Each command's `ok` count starts at 0 (the commands are known), so a dashboard reads 0, not
"No data", before the first publish or fetch."""
from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from ringserve.protocol.messages import SHARD_COMMANDS

BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ShardMetrics:
    def __init__(self, shard: str, commands: Iterable[str] = SHARD_COMMANDS) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.versions = Gauge("ringserve_shard_versions", "Committed versions kept, by model", ["model"], registry=r)
        self.current = Gauge("ringserve_shard_current_version", "Current version, by model", ["model"], registry=r)
        self.bytes = Gauge("ringserve_shard_bytes_stored", "Bytes of weights this shard holds on disk", registry=r)
        self.commands = Counter("ringserve_shard_commands", "Commands answered, by command and outcome",
                                ["cmd", "outcome"], registry=r)
        self.duration = Histogram("ringserve_shard_command_duration_seconds", "Time to answer a command",
                                  ["cmd"], buckets=BUCKETS, registry=r)
        self.fetch_bytes = Counter("ringserve_shard_fetch_bytes", "Weight bytes sent to workers", registry=r)
        self.under_replicated = Gauge("ringserve_shard_under_replicated_versions",
                                      "Kept versions other owners hold that this shard lacks (repair pending)",
                                      registry=r)
        self.repaired_pieces = Counter("ringserve_shard_repaired_pieces", "Pieces copied here by repair", registry=r)
        self.repaired_bytes = Counter("ringserve_shard_repaired_bytes", "Bytes copied here by repair", registry=r)
        Gauge("ringserve_shard_info", "This shard's name", ["shard"], registry=r).labels(shard).set(1)
        for cmd in commands:
            self.commands.labels(cmd, "ok")
            self.duration.labels(cmd)

    def on_command(self, cmd: str, outcome: str, seconds: float) -> None:
        self.commands.labels(cmd, outcome).inc()
        self.duration.labels(cmd).observe(seconds)

    def on_fetch(self, nbytes: int) -> None:
        self.fetch_bytes.inc(nbytes)

    def on_repair(self, pieces: int, nbytes: int) -> None:
        self.repaired_pieces.inc(pieces)
        self.repaired_bytes.inc(nbytes)

    def refresh(self, versions: dict[str, int], current: dict[str, int], stored_bytes: int) -> None:
        for model, n in versions.items():
            self.versions.labels(model).set(n)
        for model, v in current.items():
            self.current.labels(model).set(v)
        self.bytes.set(stored_bytes)
