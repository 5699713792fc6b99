"""Traffic splitting between versions of a model: canary, A/B with sticky keys, shadow.

A route is data; choosing a version is a pure function of the route, the request's sticky
value (or a random draw) and nothing else, so it is tested without sockets. The broker asks
``choose`` for every request that does not pin a version (a pinned version always wins),
and mirrors a copy to ``route.shadow`` when one is set (its answer is only counted).

Sticky keys hash into 10,000 buckets with BLAKE2b, so a key stays on one version for as long
as the route stands, on any master, across restarts.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

BUCKETS = 10_000
MAX_TAG_LEN = 256
_RNG = random.Random()


class RouteError(ValueError):
    """A route that cannot stand: bad shares, unknown versions, bad names."""


@dataclass(frozen=True)
class Route:
    model: str
    split: tuple[tuple[int, int], ...]  # (version, percent), percents sum to 100
    sticky_key: str | None = None  # a field of the request's "tags" map
    shadow: int | None = None  # a version that gets a copy of traffic; its answers are discarded
    _cum: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        total, cum = 0, []
        for _, pct in self.split:
            total += pct * BUCKETS // 100
            cum.append(total)
        object.__setattr__(self, "_cum", tuple(cum))

    def versions(self) -> set[int]:
        return {v for v, _ in self.split} | ({self.shadow} if self.shadow is not None else set())

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("_cum")
        d["split"] = [list(p) for p in self.split]
        return d


def parse_split(text: str) -> tuple[tuple[int, int], ...]:
    """'3=90,4=10' -> ((3, 90), (4, 10)); RouteError naming what is wrong."""
    pairs = []
    for part in str(text).split(","):
        v, sep, pct = part.strip().partition("=")
        try:
            pairs.append((int(v), int(pct)))
        except ValueError:
            raise RouteError(f"split part {part!r} is not VERSION=PERCENT") from None
        if not sep:
            raise RouteError(f"split part {part!r} is not VERSION=PERCENT")
    return tuple(pairs)


def make_route(model: str, split, sticky_key: str | None = None, shadow: int | None = None,
               available: set[int] | None = None) -> Route:
    """Validate and build a route. `available`: versions some worker serves (None: do not check)."""
    if not isinstance(model, str) or not model:
        raise RouteError("a route needs a model name")
    pairs = parse_split(split) if isinstance(split, str) else tuple(tuple(p) for p in split)
    if not pairs:
        raise RouteError("a split needs at least one VERSION=PERCENT")
    for pair in pairs:
        if (len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
                or pair[0] < 0 or not 0 < pair[1] <= 100):
            raise RouteError(f"bad split entry {pair!r}: version >= 0, 0 < percent <= 100")
    versions = [v for v, _ in pairs]
    if len(set(versions)) != len(versions):
        raise RouteError("a version appears twice in the split")
    if sum(p for _, p in pairs) != 100:
        raise RouteError(f"shares sum to {sum(p for _, p in pairs)}, not 100")
    if sticky_key is not None and (not isinstance(sticky_key, str) or not sticky_key
                                   or len(sticky_key) > MAX_TAG_LEN):
        raise RouteError("sticky key must be a non-empty field name")
    if shadow is not None and (not isinstance(shadow, int) or isinstance(shadow, bool) or shadow < 0):
        raise RouteError("shadow must be a version number")
    route = Route(model, tuple((int(v), int(p)) for v, p in pairs), sticky_key, shadow)
    if available is not None:
        missing = sorted(route.versions() - available)
        if missing:
            raise RouteError(f"no worker serves {model!r} at version(s) {missing}; "
                             f"served: {sorted(available) or 'none'}")
    return route


def bucket_of(value: str) -> int:
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def choose(route: Route, sticky_value: str | None, rng: random.Random | None = None) -> int:
    """The version this request goes to: by the sticky value's bucket, else a random draw."""
    b = bucket_of(sticky_value) if sticky_value is not None else (rng or _RNG).randrange(BUCKETS)
    for (version, _), upto in zip(route.split, route._cum):
        if b < upto:
            return version
    return route.split[-1][0]


def sticky_value(route: Route, tags) -> str | None:
    """The request's value for the route's sticky key, if it carries one."""
    if route.sticky_key is None or not isinstance(tags, dict):
        return None
    v = tags.get(route.sticky_key)
    return v if isinstance(v, str) and len(v) <= MAX_TAG_LEN else None


def promote(route: Route, version: int) -> Route:
    return Route(route.model, ((version, 100),))


# ------------------------------------------------------------------ on disk
def save_routes(path: str | os.PathLike, routes: dict[str, Route]) -> None:
    """Write atomically (tmp, fsync, rename) so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({m: r.to_json() for m, r in routes.items()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_routes(path: str | os.PathLike) -> dict[str, Route]:
    """Routes kept by an earlier master; an unreadable file is an error, not an empty table."""
    path = Path(path)
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {m: make_route(m, d["split"], d.get("sticky_key"), d.get("shadow")) for m, d in data.items()}
