"""What active masters share, and how two route tables become one.

Several masters serve at once (docs/architecture.md, "Several active masters"): every worker
registers with each, every client talks to one. What must not be lost with one master is
small: the traffic routes (canary, sticky, shadow splits). Each master keeps its route table
with a clock, ``(counter, epoch)``: a change made on a master takes ``max(counters seen) + 1``
and that master's epoch; peers exchange their tables every ``--peer-interval`` and each keeps
the table with the larger clock (last writer wins, ties broken by epoch). So a route set on one
master is in force on the others within one interval, and after a partition heals both sides
converge on one table with no operator. Pure functions; the broker moves the bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ringserve.protocol.envelope import MAX_NAME_LEN

Clock = tuple[int, str]
MAX_PEER_ROUTES = 1024  # routes a peer's table may hold (more is refused as malformed)


@dataclass
class PeerState:
    """What this master last heard from one peer (shown in status)."""

    endpoint: str
    epoch: str | None = None
    last_heard: float | None = None
    routes_clock: Clock | None = None
    workers: int | None = None
    sent_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def next_clock(mine: Clock, epoch: str) -> Clock:
    """The clock of a change made here: after everything this master has seen."""
    return (mine[0] + 1, epoch)


def newer(theirs: Any, mine: Clock) -> bool:
    """Whether a peer's table (its clock) replaces ours: a larger counter, or the same counter and a
    larger epoch (so two masters that changed routes at once still agree on one)."""
    return (isinstance(theirs, (list, tuple)) and len(theirs) == 2 and type(theirs[0]) is int
            and isinstance(theirs[1], str) and len(theirs[1]) <= MAX_NAME_LEN
            and (theirs[0], theirs[1]) > tuple(mine))


def clock_of(value: Any) -> Clock:
    return (int(value[0]), str(value[1]))


def peer_routes(value: Any) -> dict[str, dict]:
    """A peer's route table (model -> route JSON), checked for shape; routing.Route.from_json checks the rest."""
    if not isinstance(value, dict) or len(value) > MAX_PEER_ROUTES:
        raise ValueError("routes must be a map of at most 1024 models")
    for model, route in value.items():
        if not isinstance(model, str) or not 0 < len(model) <= MAX_NAME_LEN or not isinstance(route, dict):
            raise ValueError("each route must be a model name mapped to a route")
    return value
