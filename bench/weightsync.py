"""Weight sync through the parameter servers vs plain ZeroMQ; prints one JSON line.

~105 MB fp32 model (100 x 512x512 layers) on 4 shards and 4 workers, `--rounds` rounds (median
reported, every figure of a round measured in the same run):

full_sync_s: from the start of a publish of entirely new weights (every piece changes) until
every worker serves it. raw_zmq_s: the bytes that full sync moved (the publish, plus what the
shards sent the workers, counted by the shards: 5 x the model) pushed over one plain ZeroMQ
PUSH/PULL pair on loopback, one receive per frame, nothing hashed or stored. full_ratio =
full_sync_s / raw_zmq_s (issue 11's target <= 2). delta_sync_s: a delta changing one layer
(1%); delta_vs_full = delta_sync_s / full_sync_s (target <= 0.1). Each round syncs a full
version and a delta idle (the ratios), then again under a light request load (one request
every 20 ms: `*_under_load_s`); failed_requests: requests that failed meanwhile (target 0).
cpu_s_first_full: CPU seconds each role spent during the first full sync (from /proc);
cpu_s_first_full_by_thread: the same per thread name (/proc/PID/task; ZeroMQ's I/O threads are
ZMQbg/IO/0, Python's threads all "python"), summed over a role's processes (a thread that ended
meanwhile, such as the publisher's hashing pool, is left out); minor_faults_first_full: the page
faults each role took meanwhile (fresh pages its buffers touched); cpu_s_full_rounds /
minor_faults_full_rounds: the same two for every idle full round (the first, cold, against the
warm ones).
breakdown_first_full (with `--role-log-level info`): where the first full sync's wall time went,
seconds from the start of its publish, from the bench's own marks (the publisher is this
process) and the timestamps in the shards' and workers' logs: stage sent, each shard's write and
fsync (median and last shard), its staged manifest's write and fsync, its wait for the writer
thread and its time from receipt to durable (`shard_manifest_s`, `shard_queued_s`,
`shard_durable_s`: fastest and slowest shard), stages answered, commit done, the workers' prefetch of the staged
version (last to finish), their fetch after the commit (manifest, transfer, build), last swap;
breakdown_first_delta: the same for the first (idle) delta. delta_steps_rounds: for every idle
delta, the publisher's own marks (seconds from its start: hello, layout, stage_sent,
stage_answered, commit_arbiter, commit_rest, publish, all_on; at any log level);
cpu_s_delta_rounds: the CPU each role spent in each idle delta.

--warmup-rounds N runs N rounds first, the same as the measured ones, and keeps none of their
figures: the roles' memory then starts the measured rounds at its steady state. Without it (the
default, as in every earlier figure) the first measured rounds include that growth: a shard holds
its last 3 versions in memory, so its heap grows over the first two full syncs, and on this VM a
page the process has not touched before costs ~10 us to fault in (the kernel zeroing it).

Replication (issue 20; `--replicas`, default 2): with `--kill-shard`, one more full sync in
which the last shard is SIGKILLed right after the publish commits, while the workers fetch:
sync_with_shard_killed_s (target <= 2 x full_sync_s), failed_syncs (workers not on the new
version within 300 s; target 0). pieces_moved_fraction: the share of the current version's
pieces whose owner set changes when one more shard joins the ring (target <= 1.5 x R/N).
"""
from __future__ import annotations

import argparse
import json
import shutil
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ringserve.client import Client  # noqa: E402
from ringserve.client.admin import AdminClient  # noqa: E402
from ringserve.client.params import ParamClient  # noqa: E402
from ringserve.launch.logsetup import configure_logging  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_until  # noqa: E402
from ringserve.worker import demo  # noqa: E402

EPH = "tcp://127.0.0.1:*"


def raw_zmq_seconds(total: int, chunk: int = 4 << 20) -> float:
    """Seconds to push `total` bytes in frames of `chunk` bytes over one PUSH/PULL pair on loopback."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for s in (pull, push):
        s.setsockopt(zmq.LINGER, 0)
    pull.bind("tcp://127.0.0.1:*")
    push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
    payload = memoryview(np.ones(chunk // 4, np.float32)).cast("B")
    got = [0]

    def recv():
        while got[0] < total:
            got[0] += len(pull.recv(copy=False).buffer)

    t = threading.Thread(target=recv)
    t0 = time.perf_counter()
    t.start()
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        push.send(payload[:n], copy=False)
        sent += n
    t.join()
    took = time.perf_counter() - t0
    pull.close()
    push.close()
    ctx.term()
    return took


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (Linux /proc; 0 elsewhere): fresh pages a buffer touched."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of a process so far, by thread name (threads of one name summed)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def roles_thread_cpu(pids: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """{role: {thread name: CPU seconds, summed over the role's processes}}."""
    out: dict[str, dict[str, float]] = {}
    for role, ps in pids.items():
        acc = out.setdefault(role, {})
        for pid in ps:
            for name, s in thread_cpu(pid).items():
                acc[name] = acc.get(name, 0.0) + s
    return out


def _events(path: Path, version: int) -> dict[str, list[dict]]:
    """A role log's events about `version` of the bench's model, by name, with `t` (epoch seconds)."""
    out: dict[str, list[dict]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            e = json.loads(line)
            if e.get("version") != version or e.get("model") != "big":
                continue
            e["t"] = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, AttributeError, TypeError):
            continue
        out.setdefault(e["event"], []).append(e)
    return out


def breakdown(tmp: Path, version: int, marks: dict, shards: int, workers: int) -> dict:
    """Where the wall time of the sync of `version` went (seconds from `marks["start"]`)."""
    t0 = marks["start"]

    def at(t):
        return None if t is None else round(t - t0, 3)

    out: dict = {"stage_sent": at(marks.get("stage_sent")), "stages_answered": at(marks.get("stage_answered")),
                 "commit_done": at(marks.get("publish_done"))}
    staged = [e for i in range(shards) for e in _events(tmp / f"ps{i}.log", version).get("version_staged", [])]
    if staged:  # logged when the pieces are durable; write and fsync came just before
        ends = sorted(e["t"] for e in staged)
        out["shard_write_s"] = [min(e.get("write_s") or 0 for e in staged), max(e.get("write_s") or 0 for e in staged)]
        out["shard_fsync_s"] = [min(e.get("fsync_s") or 0 for e in staged), max(e.get("fsync_s") or 0 for e in staged)]
        out["shard_check_s"] = [min(e.get("check_s") or 0 for e in staged), max(e.get("check_s") or 0 for e in staged)]
        for key in ("manifest_s", "queued_s", "durable_s"):  # the staged manifest's write + fsync; waits
            if all(e.get(key) is not None for e in staged):
                out[f"shard_{key}"] = [min(e[key] for e in staged), max(e[key] for e in staged)]
        out["shards_durable"] = [at(ends[0]), at(ends[-1])]
    ws = [_events(tmp / f"w{i}.log", version) for i in range(workers)]

    def last(name, key="t"):
        got = [e[key] for w in ws for e in w.get(name, [])[-1:] if e.get(key) is not None]
        return got

    pre = last("weights_prefetched")
    if pre:
        out["workers_prefetched"] = [at(min(pre)), at(max(pre))]
        out["worker_prefetch_s"] = [min(last("weights_prefetched", "seconds")), max(last("weights_prefetched", "seconds"))]
        for key, name in (("manifest_s", "worker_premanifest_s"), ("transfer_s", "worker_pretransfer_s"),
                          ("build_s", "worker_prebuild_s")):
            vals = last("weights_prefetched", key)
            if vals:
                out[name] = [min(vals), max(vals)]
    started = last("weights_fetch_started")
    if started:
        out["workers_saw_commit"] = [at(min(started)), at(max(started))]
    for key in ("manifest_s", "transfer_s", "build_s"):
        vals = last("weights_fetched", key)
        if vals:
            out[f"worker_{key}"] = [min(vals), max(vals)]
    swaps = last("weights_swapped")
    if swaps:
        out["workers_swapped"] = [at(min(swaps)), at(max(swaps))]
    out["all_serving_seen"] = at(marks.get("all_on"))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-rounds", type=int, default=0,
                   help="rounds run first and not measured (0: the first measured round is the cluster's first sync)")
    p.add_argument("--replicas", type=int, default=None, help="copies of each piece (default 2)")
    p.add_argument("--role-log-level", default="warning",
                   help="the shards' and workers' log level (info: per-phase timers in their logs)")
    p.add_argument("--durability", default=None, choices=("fsync", "replicated"),
                   help="the shards' --durability (default: theirs, fsync)")
    p.add_argument("--kill-shard", action="store_true",
                   help="also time a full sync with a shard SIGKILLed while the workers fetch")
    args = p.parse_args(argv)
    configure_logging("bench", "warning")  # logs to stderr: stdout is the one JSON line
    tmp = Path(tempfile.mkdtemp(prefix="rs-wsync-"))
    print(f"role logs in {tmp} (the shards' data dirs there are removed at the end)", file=sys.stderr)
    spec = f"big=ringserve.worker.demo:stack,arg.layers={args.layers},arg.width={args.width}"
    procs: list[RoleProcess] = []
    try:
        shards = [RoleProcess("ringserve.launch.ps", ["--name", f"ps{i}", "--data-dir", str(tmp / f"ps{i}"), "--bind", EPH,
                                            "--pub", EPH, "--announce-interval", "0.2", "--log-level", args.role_log_level,
                                            *(["--durability", args.durability] if args.durability else [])],
                              tmp / f"ps{i}.log", wait_ready=False) for i in range(args.shards)]
        procs += shards
        for s in shards:
            s.wait_ready()
        eps = {s.info["name"]: s.info["endpoint"] for s in shards}
        master = RoleProcess("ringserve.launch.master", ["--frontend", EPH, "--backend", EPH, "--admin", EPH,
                                               "--log-level", "warning"], tmp / "master.log")
        procs.append(master)
        workers = [RoleProcess("ringserve.launch.worker", ["--master", master.info["backend"], "--name", f"w{i}",
                                                 "--model", spec, "--threads", "1", "--log-level", args.role_log_level,
                                                 "--paramservers", ",".join(f"{n}={e}" for n, e in eps.items()),
                                                 *(["--replicas", str(args.replicas)] if args.replicas else [])],
                               tmp / f"w{i}.log", wait_ready=False) for i in range(args.workers)]
        procs += workers
        for w in workers:
            w.wait_ready()
        admin = AdminClient(master.info["admin"])
        wait_until(lambda: len(admin.status()["workers"]) == args.workers, 60, what="workers")
        state = {k: v.numpy().copy() for k, v in demo.stack(args.layers, args.width, seed=1).state_dict().items()}
        nbytes = sum(a.nbytes for a in state.values())
        x = {"x": np.ones((1, args.width), np.float32)}
        failures, stop, loaded = [0], threading.Event(), threading.Event()

        def light_load(client):
            while not stop.is_set():
                if not loaded.wait(0.05):
                    continue
                try:
                    client.infer("big", x, timeout=30)
                except Exception:
                    failures[0] += 1
                time.sleep(0.02)

        def all_on(version):
            return all(w["models"]["big"].get("version") == version for w in admin.status()["workers"])

        runs: dict[str, list[float]] = {"full": [], "delta": [], "full_loaded": [], "delta_loaded": []}
        moved, cpu, publish_s, publishes, delta_publishes = [], {}, 0.0, [], []
        pids = {"publisher": [os.getpid()], "shards": [s.pid for s in shards], "workers": [w.pid for w in workers]}
        killed: dict = {}
        first_marks: dict = {}
        delta_marks: dict = {}
        cpu_threads: dict = {}
        delta_steps: list[dict] = []
        faults: dict = {}
        with ParamClient(eps, replicas=args.replicas) as pc, Client(master.info["frontend"], timeout=60) as c:
            def sent_by_shards():  # shards that do not count them (before issue 11): every worker fetched it all
                hellos = list(pc.hello().values())
                return sum(h["fetch_bytes"] for h in hellos) if all("fetch_bytes" in h for h in hellos) else None

            real_call, marks = pc.rpc.call, {}

            def step_of(requests) -> str | None:  # which step of a publish a call is (its marks)
                cmds = {h.get("cmd") for h, _ in requests.values()}
                if cmds == {"stage"}:
                    return "stage"
                if cmds == {"commit"}:
                    return "commit_arbiter" if "commit_arbiter_done" not in marks else "commit_rest"
                if cmds == {"hello"}:
                    return "hello"
                if cmds == {"fetch"}:
                    return "layout"
                return None

            def marked_call(requests, *a, **kw):  # when each step of the publish is sent and answered
                step = step_of(requests) if "start" in marks else None
                if step == "stage":
                    marks.setdefault("stage_sent", time.time())
                try:
                    return real_call(requests, *a, **kw)
                finally:
                    if step == "stage":
                        marks.setdefault("stage_answered", time.time())
                    elif step is not None:
                        marks.setdefault(f"{step}_done", time.time())

            pc.rpc.call = marked_call

            def timed_publish(tensors, base=None):
                version = 1 + max(v for s in pc.versions("big").values() for v in s["versions"] or [0])
                marks.clear()
                marks["start"], marks["version"] = time.time(), version
                t0 = time.perf_counter()
                pc.publish("big", tensors, base=base, check_workers=False)  # publish_s: the publisher alone
                publish_s = time.perf_counter() - t0
                marks["publish_done"] = time.time()
                wait_until(lambda: all_on(version), 300, 0.01, f"v{version} everywhere")
                marks["all_on"] = time.time()
                if base is not None and not loaded.is_set():  # every idle delta's steps, seconds from its start (the publisher's marks)
                    delta_steps.append({k[:-5] if k.endswith("_done") else k: round(v - marks["start"], 4)
                                        for k, v in marks.items() if k not in ("start", "version")})
                return time.perf_counter() - t0, publish_s

            load = threading.Thread(target=light_load, args=(c,))
            load.start()
            k = 0
            cpu_rounds, fault_rounds, cpu_deltas = [], [], []

            def full_of(k):  # a round's full version: every piece changes (a real full sync)
                return {name: a + k for name, a in state.items()}

            def delta_of(fresh):  # its delta: one layer of the 100
                return {"layers.0.weight": fresh["layers.0.weight"] + 0.01}

            for _ in range(args.warmup_rounds):  # rounds run as the measured ones, their figures not kept
                for under_load in (False, True):
                    (loaded.set if under_load else loaded.clear)()
                    time.sleep(0.5)
                    k += 1
                    fresh = full_of(k)
                    timed_publish(fresh)
                    time.sleep(0.5)
                    timed_publish(delta_of(fresh), base=pc.versions("big")["ps0"]["current"])
            delta_steps.clear()
            for r in range(args.rounds):
                for under_load in (False, True):
                    (loaded.set if under_load else loaded.clear)()
                    time.sleep(0.5)
                    k += 1
                    fresh = full_of(k)
                    before = sent_by_shards()
                    cpu0 = {role: sum(map(cpu_seconds, ps)) for role, ps in pids.items()}
                    threads0 = roles_thread_cpu(pids) if r == 0 and not under_load else {}
                    faults0 = {role: sum(map(minor_faults, ps)) for role, ps in pids.items()}
                    took, pub = timed_publish(fresh)
                    if not under_load:  # every idle full round's CPU and faults: the cold round vs the warm ones
                        cpu_rounds.append({role: round(sum(map(cpu_seconds, ps)) - cpu0[role], 2) for role, ps in pids.items()})
                        fault_rounds.append({role: sum(map(minor_faults, ps)) - faults0[role] for role, ps in pids.items()})
                    if r == 0 and not under_load:
                        cpu = {role: round(sum(map(cpu_seconds, ps)) - cpu0[role], 2) for role, ps in pids.items()}
                        threads1 = roles_thread_cpu(pids)
                        faults = {role: sum(map(minor_faults, ps)) - faults0[role] for role, ps in pids.items()}
                        cpu_threads = {role: {name: round(s - threads0.get(role, {}).get(name, 0.0), 2)
                                              for name, s in sorted(by.items())
                                              if s - threads0.get(role, {}).get(name, 0.0) >= 0.005}
                                       for role, by in threads1.items()}
                        publish_s = pub
                        first_marks = dict(marks)
                    after = sent_by_shards()
                    moved.append(nbytes + (after - before if after is not None else nbytes * args.workers))
                    runs["full_loaded" if under_load else "full"].append(took)
                    publishes.append(pub)
                    time.sleep(0.5)
                    changed = delta_of(fresh)
                    delta_base = pc.versions("big")["ps0"]["current"]
                    cpu0 = {role: sum(map(cpu_seconds, ps)) for role, ps in pids.items()}
                    took, pub = timed_publish(changed, base=delta_base)
                    if not under_load:  # the CPU each role spent in each idle delta (the 2 cores they share)
                        cpu_deltas.append({role: round(sum(map(cpu_seconds, ps)) - cpu0[role], 3)
                                           for role, ps in pids.items()})
                    if r == 0 and not under_load:
                        delta_marks = dict(marks)
                    runs["delta_loaded" if under_load else "delta"].append(took)
                    delta_publishes.append(pub)
            if args.kill_shard:
                loaded.set()
                k += 1
                fresh = full_of(k)
                version = 1 + max(v for s in pc.versions("big").values() for v in s["versions"] or [0])
                t0 = time.perf_counter()
                pc.publish("big", fresh, check_workers=False)
                shards[-1].signal(9)  # SIGKILL while every worker fetches
                try:
                    wait_until(lambda: all_on(version), 300, 0.01, f"v{version} everywhere")
                    failed_syncs = 0
                except Exception:  # noqa: BLE001 - counted
                    failed_syncs = sum(1 for w in admin.status()["workers"]
                                       if w["models"]["big"].get("version") != version)
                killed = {"sync_with_shard_killed_s": round(time.perf_counter() - t0, 3), "failed_syncs": failed_syncs}
            from ringserve.protocol.placement import moved_keys
            keys = sorted({item[0] for items in pc.manifests("big", max(
                v for s in pc.versions("big").values() for v in s["versions"] or [0])).values() for item in items})
            moved_frac = len(moved_keys(keys, eps, [*eps, f"ps{args.shards}"], pc.replicas)) / max(1, len(keys))
            stop.set()
            load.join(timeout=60)
        time.sleep(0.3)  # the roles' last log lines are written
        parts = (breakdown(tmp, first_marks["version"], first_marks, args.shards, args.workers)
                 if args.role_log_level in ("info", "debug") and first_marks else None)
        delta_parts = (breakdown(tmp, delta_marks["version"], delta_marks, args.shards, args.workers)
                       if args.role_log_level in ("info", "debug") and delta_marks else None)
        raw = [raw_zmq_seconds(total) for total in moved]
        med = {name: statistics.median(values) for name, values in runs.items()}
        raw_s = statistics.median(raw)
        print(json.dumps({
            "model_mb": round(nbytes / 1e6, 1), "shards": args.shards, "workers": args.workers, "rounds": args.rounds,
            "warmup_rounds": args.warmup_rounds,
            "full_sync_s": round(med["full"], 3), "full_publish_first_s": round(publish_s, 3),
            "raw_zmq_s": round(raw_s, 3), "bytes_moved_mb": round(statistics.median(moved) / 1e6, 1),
            "full_ratio": round(med["full"] / raw_s, 2),
            "delta_fraction": round(state["layers.0.weight"].nbytes / nbytes, 4), "delta_sync_s": round(med["delta"], 3),
            "delta_vs_full": round(med["delta"] / med["full"], 3),
            "full_sync_under_load_s": round(med["full_loaded"], 3),
            "delta_sync_under_load_s": round(med["delta_loaded"], 3), "failed_requests": failures[0],
            "cpu_s_first_full": cpu, "cpu_s_first_full_by_thread": cpu_threads,
            "minor_faults_first_full": faults,
            "cpu_s_full_rounds": cpu_rounds, "minor_faults_full_rounds": fault_rounds, "full_publish_rounds_s": [round(t, 3) for t in publishes],
            "delta_publish_rounds_s": [round(t, 3) for t in delta_publishes],
            "delta_steps_rounds": delta_steps, "cpu_s_delta_rounds": cpu_deltas,
            "replicas": pc.replicas, **({"durability": args.durability} if args.durability else {}),
            **({"breakdown_first_full": parts} if parts else {}),
            **({"breakdown_first_delta": delta_parts} if delta_parts else {}), **killed, "pieces_moved_fraction": round(moved_frac, 4), **{f"{name}_rounds_s": [round(t, 3) for t in values] for name, values in runs.items()},
        }))
    finally:
        for proc in reversed(procs):
            proc.stop()
        for d in tmp.glob("ps*"):  # the shards' data (hundreds of MB a run); the role logs stay
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
