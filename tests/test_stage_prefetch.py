"""Issue 22 part 3: a shard writes a stage's pieces on a thread and answers the stage only once
they are durable; workers fetch (and check) the announced stage meanwhile, and serve it only
once it commits. Real shards and workers on loopback."""
from __future__ import annotations

import json
import os
import queue
import threading
import time

import numpy as np
import pytest
import zmq

from ringserve.client import Client
from ringserve.client.admin import AdminClient
from ringserve.client.params import ParamClient
from ringserve.launch.procs import wait_for_workers, wait_until
from ringserve.paramserver.shard import Shard, ShardConfig
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.digest import checksum
from ringserve.protocol.messages import SHARD_PROTO
from ringserve.worker.sync import WeightSync
from helpers import expected, mlp_state, shard_list

pytestmark = pytest.mark.timeout(120)


class InProcessShard:
    """A real Shard on loopback, its loop on a thread; its writer blocked until `release`."""

    def __init__(self, tmp, ctx: zmq.Context):
        self.shard = Shard(ShardConfig("ps0", str(tmp / "ps0"), announce_interval=0.2), ctx)
        self.gate = threading.Event()
        real = self.shard.store.write_stage

        def slow_write(*args, **kw):
            self.gate.wait(30)
            return real(*args, **kw)

        self.shard.store.write_stage = slow_write
        self.thread = threading.Thread(target=self.shard.run, daemon=True)
        self.thread.start()
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(self.shard.endpoint)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.shard.pub_endpoint)
        self.rid = 0

    def send(self, header: dict, frames=()) -> int:
        self.rid += 1
        self.dealer.send_multipart([SHARD_PROTO, pack({**header, "rid": self.rid}), *frames])
        return self.rid

    def recv(self, timeout_ms: int = 5000):
        if not self.dealer.poll(timeout_ms):
            return None
        frames = self.dealer.recv_multipart()
        return unpack_map(frames[1]), frames[2:]

    def call(self, header: dict, frames=()):
        rid = self.send(header, frames)
        for _ in range(10):  # bounded: replies to earlier requests may come first
            got = self.recv()
            assert got is not None, header
            if got[0]["rid"] == rid:
                return got
        raise AssertionError("no reply")

    def announcements(self, kind: str, timeout: float = 5.0) -> list[dict]:
        out, end = [], time.monotonic() + timeout
        while time.monotonic() < end and not out:
            if self.sub.poll(100):
                for _ in range(100):
                    try:
                        msg = unpack_map(self.sub.recv_multipart(zmq.NOBLOCK)[-1])
                    except zmq.Again:
                        break
                    if msg["kind"] == kind:
                        out.append(msg)
        return out

    def stop(self) -> None:
        self.gate.set()
        self.shard.request_stop()
        self.thread.join(10)


@pytest.fixture
def inproc(tmp_path):
    ctx = zmq.Context()
    s = InProcessShard(tmp_path, ctx)
    try:
        yield s
    finally:
        s.stop()
        ctx.destroy(linger=0)


def stage(model: str, version: int, token: str, arrays: dict, digest: str = "d1"):
    items, frames = [], []
    for name, a in arrays.items():
        buf = memoryview(np.ascontiguousarray(a)).cast("B")
        items.append([name, name, a.dtype.name, list(a.shape), 0, a.size, checksum(buf)])
        frames.append(bytes(buf))
    return {"cmd": "stage", "model": model, "version": version, "token": token, "digest": digest,
            "pieces": items}, frames


def test_a_stage_is_answered_only_once_durable_and_is_fetchable_by_token_meanwhile(inproc, tmp_path):
    arrays = {"w": np.arange(1000, dtype=np.float32), "b": np.ones(10, np.float32)}
    hdr, frames = stage("m", 1, "tok", arrays)
    time.sleep(0.3)  # the SUB is connected
    rid = inproc.send(hdr, frames)
    (note,) = inproc.announcements("staged")
    assert (note["model"], note["version"], note["token"], note["digest"]) == ("m", 1, "tok", "d1")
    assert inproc.recv(300) is None  # the pieces are not on disk yet: no answer
    fetch = {"cmd": "fetch", "model": "m", "version": 1, "stage": "tok", "digest": "d1"}
    man, _ = inproc.call({**fetch, "manifest_only": True})
    assert man["ok"] and man["digest"] == "d1" and sorted(i[0] for i in man["manifest"]) == ["b", "w"]
    got, got_frames = inproc.call({**fetch, "keys": ["w"]})
    assert got["ok"] and np.array_equal(np.frombuffer(got_frames[0], np.float32), arrays["w"])
    wrong, _ = inproc.call({**fetch, "digest": "other", "manifest_only": True})
    assert wrong["error"]["code"] == "UNKNOWN_VERSION"
    unstaged, _ = inproc.call({"cmd": "fetch", "model": "m", "version": 1, "manifest_only": True})
    assert unstaged["error"]["code"] == "UNKNOWN_VERSION"  # a stage is no version: only its token reads it
    early, _ = inproc.call({"cmd": "commit", "model": "m", "version": 1, "token": "tok", "digest": "d1"})
    assert early["error"]["code"] == "OVERLOADED" and "still being written" in early["error"]["message"]
    assert not list((tmp_path / "ps0" / "m").glob("v1.manifest.json"))
    inproc.gate.set()
    answer, _ = inproc.recv()
    assert answer["rid"] == rid and answer["ok"] and answer["staged"] == 2
    done, _ = inproc.call({"cmd": "commit", "model": "m", "version": 1, "token": "tok", "digest": "d1"})
    assert done["ok"] and (tmp_path / "ps0" / "m" / "v1.manifest.json").exists()
    after, frames_after = inproc.call({**fetch, "keys": ["b"]})  # the committed version, same content
    assert after["ok"] and np.array_equal(np.frombuffer(frames_after[0], np.float32), arrays["b"])


def test_the_writer_wakes_the_loop_only_once_its_job_is_done(inproc, monkeypatch):
    """The loop answers a stage when it finds the writer's future done; woken before that (from
    inside the job, as before the sixth round) it found it not done and slept a poll timeout more
    (100-200 ms per stage). The wake now comes from the future's done callback."""
    shard, seen = inproc.shard, []
    real_write = os.write

    def spy(fd, data):
        if fd == shard._wake_w:
            seen.append([p.stage.writing.done() for p in list(shard.pending) if p.stage.writing is not None])
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    hdr, frames = stage("m", 1, "tok", {"w": np.arange(100, dtype=np.float32)})
    rid = inproc.send(hdr, frames)
    inproc.gate.set()
    answer, _ = inproc.recv()
    assert answer["rid"] == rid and answer["ok"]
    assert seen and all(all(done) for done in seen), seen


def test_a_stage_aborted_while_written_is_answered_as_failed_and_leaves_no_piece(inproc, tmp_path):
    hdr, frames = stage("m", 1, "tok", {"w": np.arange(64, dtype=np.float32)})
    rid = inproc.send(hdr, frames)
    aborted, _ = inproc.call({"cmd": "abort", "model": "m", "version": 1, "token": "tok", "digest": "d1"})
    assert aborted["ok"]
    inproc.gate.set()
    answer, _ = inproc.recv()
    assert answer["rid"] == rid and answer["error"]["code"] == "UNKNOWN_VERSION"
    wait_until(lambda: not list((tmp_path / "ps0" / "m" / "pieces").iterdir()), 5, 0.05, "piece files collected")
    hello, _ = inproc.call({"cmd": "hello"})
    assert hello["staging"]["stages"] == 0 and hello["versions"] == {}


def events(proc, name: str) -> list[dict]:
    """The structured log events `name` a role process wrote (one JSON object a line)."""
    out = []
    for line in proc.log_path.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("event") == name:
            out.append(e)
    return out


def publish_without_commit(pc: ParamClient, model: str, state) -> dict:
    """Stage a version everywhere, as a publish does, then stop as if the publisher died before
    its commit; returns the commit's ids (to commit or abort it by hand)."""
    real, seen = pc.rpc.call, {}

    class Died(Exception):
        pass

    def call(requests, *a, **kw):
        for header, _ in requests.values():
            if header.get("cmd") == "commit":
                seen.update(header)
                raise Died
        return real(requests, *a, **kw)

    pc.rpc.call = call
    try:
        with pytest.raises(Died):
            pc.publish(model, state, check_workers=False)
    finally:
        pc.rpc.call = real
    return {k: seen[k] for k in ("model", "version", "token", "digest", "epoch")}


def test_a_worker_fetches_a_staged_version_early_but_serves_it_only_once_committed(cluster):
    eps = cluster.start_shards(2)
    cluster.start_master()
    v1, v2, v3, v4 = (mlp_state(i) for i in (1, 2, 3, 4))
    x = np.random.default_rng(0).standard_normal((2, 256), dtype=np.float32)
    with ParamClient(eps) as pc, Client(cluster.frontend, timeout=20) as c:
        pc.publish("mlp", v1, check_workers=False)
        (worker,) = cluster.start_workers(1, "--paramservers", shard_list(eps), "--log-level", "info", wait=False)
        wait_for_workers(cluster.admin, 1, 60, model="mlp", version=1)
        admin = AdminClient(cluster.admin)

        def serving():
            return admin.status()["workers"][0]["models"]["mlp"]["version"]

        ids = publish_without_commit(pc, "mlp", v2)
        wait_until(lambda: [e for e in events(worker, "weights_prefetched") if e["version"] == 2], 30, 0.05,
                   "v2 prefetched")
        time.sleep(0.5)
        r = c.infer_async("mlp", {"x": x}).result()  # staged, fetched, checked: still not served
        assert serving() == 1 and r.version == 1
        np.testing.assert_allclose(r.outputs["logits"], expected(v1, x), rtol=1e-5, atol=1e-6)
        replies = pc.rpc.call({n: ({"cmd": "commit", **ids}, []) for n in sorted(eps)})
        assert all(h["ok"] for h, _ in replies.values())
        wait_for_workers(cluster.admin, 1, 30, model="mlp", version=2)
        np.testing.assert_allclose(c.infer("mlp", {"x": x})["logits"], expected(v2, x), rtol=1e-5, atol=1e-6)
        (started,) = [e for e in events(worker, "weights_fetch_started") if e["version"] == 2]
        (fetched,) = [e for e in events(worker, "weights_fetched") if e["version"] == 2]
        assert started["prefetched"] is True and fetched["pieces_fetched"] == 0  # every piece came with the stage
        assert started["manifests_known"] is True  # every shard announced the commit of that content

        # a stage that never commits is never served; the next version (other content, same number) is
        ids3 = publish_without_commit(pc, "mlp", v3)
        wait_until(lambda: [e for e in events(worker, "weights_prefetched") if e["version"] == ids3["version"]], 30,
                   0.05, "v3 prefetched")
        pc.rpc.call({n: ({"cmd": "abort", **ids3}, []) for n in sorted(eps)})
        time.sleep(1.0)
        assert serving() == 2
        assert pc.publish("mlp", v4, version=ids3["version"], check_workers=False) == ids3["version"]
        wait_for_workers(cluster.admin, 1, 30, model="mlp", version=ids3["version"])
        np.testing.assert_allclose(c.infer("mlp", {"x": x})["logits"], expected(v4, x), rtol=1e-5, atol=1e-6)


def test_an_announcement_older_than_the_snapshot_held_is_ignored_not_a_gap():
    """Clone pattern: a snapshot (hello) can overtake announcements queued in the SUB; those are
    already in it, and must not cost a resync (which waits up to a second)."""
    ctx = zmq.Context()
    try:
        ws = WeightSync(ctx, {"ps0": "tcp://127.0.0.1:1"}, {}, queue.Queue())
        view = ws.views["ps0"]
        view.known, view.boot, view.seq, view.current = True, "b1", 4, {"m": 2}

        def note(kind, seq, **extra):
            ws._on_announce([b"m", pack({"kind": kind, "shard": "ps0", "boot": "b1", "seq": seq, "model": "m",
                                         "version": 2, "current": {"m": 1}, **extra})])

        note("staged", 3, token="t", digest="d")
        note("commit", 4, digest="d")
        note("hugz", 3)
        assert view.known and view.seq == 4 and view.current == {"m": 2}  # nothing older changed the state
        assert view.staged == {"m": (2, "t", "d")} and view.committed == {}  # a stale commit's digest is not taken
        note("commit", 5, digest="d2")
        assert view.known and view.seq == 5 and view.committed == {"m": (2, "d2")}
        note("rollback", 7)  # a gap: ask for a snapshot
        assert not view.known
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("durability", ["fsync", "replicated"])
def test_durability_says_whether_piece_files_are_fsynced_before_the_stage_is_answered(tmp_path, monkeypatch,
                                                                                       durability):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ctx = zmq.Context()
    shard = Shard(ShardConfig("ps0", str(tmp_path / "ps0"), durability=durability), ctx)
    thread = threading.Thread(target=shard.run, daemon=True)
    thread.start()
    try:
        with ParamClient({"ps0": shard.endpoint}, replicas=1) as pc:
            pc.publish("m", {"w": np.arange(4096, dtype=np.float32)}, check_workers=False)
            assert pc.versions("m")["ps0"]["current"] == 1
        pieces = [p for p in synced if "/pieces/" in p]
        manifests = [p for p in synced if ".manifest.json" in p and p.endswith(".tmp")]  # staged, or written at commit
        assert manifests  # a manifest (what makes a version exist) is always fsynced
        assert bool(pieces) == (durability == "fsync")
    finally:
        shard.request_stop()
        thread.join(10)
        ctx.destroy(linger=0)
    with pytest.raises(ValueError, match="durability"):
        Shard(ShardConfig("ps1", str(tmp_path / "ps1"), durability="never"), zmq.Context.instance())


def test_a_prefetched_stage_that_is_aborted_is_dropped_not_kept_until_a_commit(cluster):
    """A stage a worker prefetched and the publisher then aborts is announced `unstaged` by every
    shard; the worker frees what it fetched of it (it was held, unserved, until the next commit)."""
    eps = cluster.start_shards(2)
    cluster.start_master()
    v1, v2 = mlp_state(1), mlp_state(2)
    with ParamClient(eps) as pc:
        pc.publish("mlp", v1, check_workers=False)
        (worker,) = cluster.start_workers(1, "--paramservers", shard_list(eps), "--log-level", "info", wait=False)
        wait_for_workers(cluster.admin, 1, 60, model="mlp", version=1)
        ids = publish_without_commit(pc, "mlp", v2)
        wait_until(lambda: [e for e in events(worker, "weights_prefetched") if e["version"] == 2], 30, 0.05,
                   "v2 prefetched")
        replies = pc.rpc.call({n: ({"cmd": "abort", **ids}, []) for n in sorted(eps)})
        assert all(h["ok"] for h, _ in replies.values())
        wait_until(lambda: [e for e in events(worker, "weights_prefetch_dropped") if e["version"] == 2], 30, 0.05,
                   "the aborted stage's prefetch dropped")
        assert AdminClient(cluster.admin).status()["workers"][0]["models"]["mlp"]["version"] == 1
