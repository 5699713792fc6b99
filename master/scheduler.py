"""Scheduling policies: a function of the candidate workers' loads, nothing else.

Each policy gets the workers that serve the model and still have credit, and returns one
of them. Policies never see sockets, so they are tested without any.
"""
from __future__ import annotations

import math
import random
from typing import Callable, NamedTuple, Sequence


class Load(NamedTuple):
    """What a policy may know about a worker (a tuple: one is built per candidate per assignment)."""

    key: bytes
    outstanding: int
    credit: int
    weight: float = 1.0


Policy = Callable[[Sequence[Load]], bytes]


def least_outstanding(rng: random.Random) -> Policy:
    """Fewest requests in flight relative to credit; ties broken at random."""

    def choose(loads: Sequence[Load]) -> bytes:
        if len(loads) == 1:  # the common case with one worker free: nothing to compare or draw
            return loads[0].key
        best = min(ld.outstanding / max(ld.credit, 1) for ld in loads)
        ties = [ld for ld in loads if ld.outstanding / max(ld.credit, 1) == best]
        return rng.choice(ties).key

    return choose


def round_robin(rng: random.Random) -> Policy:
    """The next worker after the one chosen last, in a stable order (skipping full ones)."""
    last: list[bytes] = []

    def choose(loads: Sequence[Load]) -> bytes:
        if len(loads) == 1:
            last[:] = [loads[0].key]
            return loads[0].key
        ordered = sorted(ld.key for ld in loads)
        nxt = next((k for k in ordered if last and k > last[0]), ordered[0])
        last[:] = [nxt]
        return nxt

    return choose


def uniform_random(rng: random.Random) -> Policy:
    def choose(loads: Sequence[Load]) -> bytes:
        return loads[0].key if len(loads) == 1 else rng.choice(loads).key

    return choose


def usable_weight(weight: float) -> float:
    """A weight random.choices can use: NaN, infinite or non-positive ones count as almost nothing."""
    return weight if math.isfinite(weight) and weight > 0 else 1e-9


def weighted_random(rng: random.Random) -> Policy:
    """P(i) = W(i) / sum(W) over the candidates."""

    def choose(loads: Sequence[Load]) -> bytes:
        if len(loads) == 1:
            return loads[0].key
        return rng.choices([ld.key for ld in loads], weights=[usable_weight(ld.weight) for ld in loads])[0]

    return choose


def power_of_two(rng: random.Random) -> Policy:
    """Sample two candidates, keep the less loaded (Mitzenmacher's power of two choices)."""

    def choose(loads: Sequence[Load]) -> bytes:
        if len(loads) == 1:
            return loads[0].key
        a, b = rng.sample(list(loads), 2)
        return a.key if a.outstanding / max(a.credit, 1) <= b.outstanding / max(b.credit, 1) else b.key

    return choose


POLICIES: dict[str, Callable[[random.Random], Policy]] = {
    "least-outstanding": least_outstanding,
    "round-robin": round_robin,
    "random": uniform_random,
    "weighted-random": weighted_random,
    "power-of-two": power_of_two,
}


def make_policy(name: str, seed: int | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name](random.Random(seed))
