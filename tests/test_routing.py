"""Traffic splitting as pure functions: shares, sticky keys, validation, persistence."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from ringserve.master.routing import (Route, RouteError, choose, load_routes, make_route, promote, save_routes,
                                      sticky_value)


def test_observed_split_is_within_three_points_over_2000_requests():
    route = make_route("m", "3=90,4=10")
    rng = random.Random(1)
    seen = Counter(choose(route, None, rng) for _ in range(2000))
    assert abs(seen[3] / 2000 * 100 - 90) <= 3 and abs(seen[4] / 2000 * 100 - 10) <= 3
    three = make_route("m", [(1, 50), (2, 30), (3, 20)])
    seen = Counter(choose(three, f"user-{i}") for i in range(2000))  # sticky keys spread too
    for v, pct in three.split:
        assert abs(seen[v] / 2000 * 100 - pct) <= 3, seen


def test_sticky_key_never_changes_version_while_the_route_stands():
    route = make_route("m", "1=50,2=50", sticky_key="user")
    first = {u: choose(route, sticky_value(route, {"user": u})) for u in (f"u{i}" for i in range(500))}
    for _ in range(5):
        assert all(choose(route, sticky_value(route, {"user": u})) == v for u, v in first.items())
    assert set(first.values()) == {1, 2}
    assert sticky_value(route, {"other": "x"}) is None and sticky_value(route, "garbage") is None


@pytest.mark.parametrize("split,err", [("3=90,4=20", "sum to 110"), ("3=90", "sum to 90"), ("x=100", "VERSION=PERCENT"),
                                       ("3=50,3=50", "twice"), ("", "VERSION=PERCENT"), ("3=0,4=100", "percent")])
def test_bad_routes_are_refused_with_a_reason(split, err):
    with pytest.raises(RouteError, match=err):
        make_route("m", split)


def test_routes_to_versions_nobody_serves_are_refused():
    with pytest.raises(RouteError, match=r"version\(s\) \[5\]"):
        make_route("m", "3=90,5=10", available={3, 4})
    with pytest.raises(RouteError, match="version"):
        make_route("m", "3=100", shadow=9, available={3})
    assert make_route("m", "3=90,4=10", shadow=4, available={3, 4}).versions() == {3, 4}


def test_routes_survive_a_restart_on_disk(tmp_path):
    routes = {"m": make_route("m", "3=90,4=10", sticky_key="user", shadow=4), "n": promote(make_route("n", "1=100"), 2)}
    save_routes(tmp_path / "routes.json", routes)
    back = load_routes(tmp_path / "routes.json")
    assert back == routes and isinstance(back["m"], Route) and back["n"].split == ((2, 100),)
    assert load_routes(tmp_path / "absent.json") == {}
