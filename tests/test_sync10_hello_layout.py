"""Issue 22 part 3, eighth round: a publish reads the layout it checks against from the shards'
hello (`layout_of`), one round trip fewer than asking for their manifests; it falls back to the
manifests when too few hellos carry it (a shard from before), and refuses the same bad versions
either way. Real shards on loopback, no workers needed (`check_workers=False`)."""
from __future__ import annotations

import pytest
import torch

from ringserve.client.params import ParamClient, PublishError
from helpers import mlp_state

pytestmark = pytest.mark.timeout(90)

SMALL_CHUNK = 64 * 1024


def _record(pc: ParamClient, strip_layout: bool = False) -> list[set]:
    """Wrap the client's calls: record each call's commands; optionally drop `layout_of` from
    the replies (what a shard from before this round answers)."""
    calls: list[set] = []
    real = pc.rpc.call

    def call(requests, *a, **kw):
        calls.append({h.get("cmd") for h, _ in requests.values()})
        replies = real(requests, *a, **kw)
        if strip_layout:
            for h, _ in replies.values():
                h.pop("layout_of", None)
        return replies

    pc.rpc.call = call
    return calls


def test_hello_carries_the_asked_layout_and_a_delta_needs_no_manifest_call(cluster):
    eps = cluster.start_shards(3)
    base = mlp_state(1)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as pc:
        assert pc.publish("mlp", base, check_workers=False) == 1
        hellos = pc.hello(layout_of={"model": "mlp", "version": None})
        union = {}
        for h in hellos.values():
            lay = h["layout_of"]
            assert lay["model"] == "mlp" and lay["version"] == 1 and lay["layout"]
            union.update({k: (d, tuple(s)) for k, (d, s) in lay["layout"].items()})
        assert union == {k: ("float32", tuple(v.shape)) for k, v in base.items()}
        unknown = pc.hello(layout_of={"model": "mlp", "version": 7})
        assert all(h["layout_of"] == {"model": "mlp", "version": 7, "layout": None} for h in unknown.values())
        plain = pc.hello()
        assert all("layout_of" not in h for h in plain.values())

        calls = _record(pc)
        assert pc.publish("mlp", {"net.2.bias": base["net.2.bias"] + 1}, base=1, check_workers=False) == 2
        assert {"fetch"} not in calls and calls[0] == {"hello"}  # the layout came with the hello
        calls.clear()
        with pytest.raises(PublishError, match="refused"):  # the check itself is unchanged
            pc.publish("mlp", {"net.2.bias": torch.zeros(3)}, base=1, check_workers=False)
        assert {"stage"} not in calls
        with pytest.raises(PublishError, match="refused"):
            pc.publish("mlp", {"net.2.weight": base["net.2.weight"]}, check_workers=False)  # full: missing tensors


def test_without_layout_in_the_hellos_the_manifests_are_read(cluster):
    eps = cluster.start_shards(3)
    base = mlp_state(2)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as pc:
        assert pc.publish("mlp", base, check_workers=False) == 1
        calls = _record(pc, strip_layout=True)
        with pytest.raises(PublishError, match="refused"):
            pc.publish("mlp", {"net.2.bias": torch.zeros(3)}, base=1, check_workers=False)
        assert {"fetch"} in calls and {"stage"} not in calls
        calls.clear()
        assert pc.publish("mlp", {"net.2.bias": base["net.2.bias"] + 1}, base=1, check_workers=False) == 2
        assert {"fetch"} in calls


def test_a_bad_layout_request_is_refused_and_the_shard_serves_on(cluster):
    eps = cluster.start_shards(1)
    with ParamClient(eps) as pc:
        for bad in ("mlp", {"model": "../x", "version": None}, {"model": "mlp", "version": -1},
                    {"model": "mlp", "version": True}):
            replies = pc.rpc.call_all({"cmd": "hello", "layout_of": bad}, raise_on_error=False)
            (h, _), = replies.values()
            assert not h["ok"] and h["error"]["code"] == "BAD_REQUEST", bad
        assert all(h["ok"] for h in pc.hello().values())


def test_a_malformed_hello_layout_is_not_used():
    pc = ParamClient({"ps0": "tcp://127.0.0.1:9", "ps1": "tcp://127.0.0.1:10"}, replicas=1)
    try:
        good = {"model": "m", "version": 3, "layout": {"w": ["float32", [2, 3]]}}
        assert pc._hello_layout({"ps0": {"layout_of": good}, "ps1": {"layout_of": good}}, "m", 3) == {
            "w": ("float32", (2, 3))}
        assert pc._hello_layout({"ps0": {"layout_of": good}}, "m", 3) is None  # one of two: not every piece
        assert pc._hello_layout({"ps0": {"layout_of": good}, "ps1": {"layout_of": good}}, "m", 4) is None
        for entry in (["float32"], ["float32", [2, -1]], ["float32", [True]], [3, [2]], "float32[2]"):
            bad = {**good, "layout": {"w": entry}}
            assert pc._hello_layout({"ps0": {"layout_of": bad}, "ps1": {"layout_of": good}}, "m", 3) is None
    finally:
        pc.close()


def test_place_on_a_built_ring_groups_as_on_the_names():
    """The publisher passes its own ring to `place`: the grouping is the one the names give."""
    from ringserve.protocol.placement import place, plan, ring
    names = ["ps-2", "ps-0", "ps-1", "ps-3"]
    pieces = plan({f"w{i}": ("float32", [64, 64], 4) for i in range(20)}, chunk_bytes=4096)
    for replicas in (1, 2, 3):
        assert place(pieces, ring(names), replicas) == place(pieces, names, replicas)
