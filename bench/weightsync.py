"""Weight sync through the parameter servers vs plain ZeroMQ; prints one JSON line.

~100 MB fp32 model (100 x 512x512 layers) on 4 shards and 4 workers. full_sync_s: from the
start of a publish until every worker serves the new version. raw_zmq_s: the same bytes
moved over plain ZeroMQ PUSH/PULL on loopback in this run (publisher->shards once, then
shards->each worker: 5 x the model). delta_sync_s: a delta changing one layer (1%).
failed_requests: requests that failed under a light load during both syncs.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
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


def raw_zmq_seconds(nbytes: int, copies: int, chunk: int = 4 << 20) -> float:
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for s in (pull, push):
        s.setsockopt(zmq.LINGER, 0)
    pull.bind("tcp://127.0.0.1:*")
    push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
    payload = memoryview(np.ones(chunk // 4, np.float32)).cast("B")
    total = nbytes * copies
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args(argv)
    configure_logging("bench", "warning")  # logs to stderr: stdout is the one JSON line
    tmp = Path(tempfile.mkdtemp(prefix="rs-wsync-"))
    spec = f"big=ringserve.worker.demo:stack,arg.layers={args.layers},arg.width={args.width}"
    procs: list[RoleProcess] = []
    try:
        shards = [RoleProcess("ringserve.launch.ps", ["--name", f"ps{i}", "--data-dir", str(tmp / f"ps{i}"), "--bind", EPH,
                                            "--pub", EPH, "--announce-interval", "0.2", "--log-level", "warning"],
                              tmp / f"ps{i}.log", wait_ready=False) for i in range(args.shards)]
        procs += shards
        for s in shards:
            s.wait_ready()
        eps = {s.info["name"]: s.info["endpoint"] for s in shards}
        master = RoleProcess("ringserve.launch.master", ["--frontend", EPH, "--backend", EPH, "--admin", EPH,
                                               "--log-level", "warning"], tmp / "master.log")
        procs.append(master)
        workers = [RoleProcess("ringserve.launch.worker", ["--master", master.info["backend"], "--name", f"w{i}",
                                                 "--model", spec, "--threads", "1", "--log-level", "warning",
                                                 "--paramservers", ",".join(f"{n}={e}" for n, e in eps.items())],
                               tmp / f"w{i}.log", wait_ready=False) for i in range(args.workers)]
        procs += workers
        for w in workers:
            w.wait_ready()
        admin = AdminClient(master.info["admin"])
        wait_until(lambda: len(admin.status()["workers"]) == args.workers, 60, what="workers")
        state = {k: v.numpy().copy() for k, v in demo.stack(args.layers, args.width, seed=1).state_dict().items()}
        nbytes = sum(a.nbytes for a in state.values())
        x = {"x": np.ones((1, args.width), np.float32)}
        failures, stop = [0], threading.Event()

        def light_load(client):
            while not stop.is_set():
                try:
                    client.infer("big", x, timeout=30)
                except Exception:
                    failures[0] += 1
                time.sleep(0.02)

        def all_on(version):
            return all(w["models"]["big"].get("version") == version for w in admin.status()["workers"])

        with ParamClient(eps) as pc, Client(master.info["frontend"], timeout=60) as c:
            t0 = time.perf_counter()
            pc.publish("big", state)
            publish_s = time.perf_counter() - t0
            wait_until(lambda: all_on(1), 300, 0.01, "v1 everywhere")
            full_s = time.perf_counter() - t0
            load = threading.Thread(target=light_load, args=(c,))
            load.start()
            v2 = dict(state)
            v2["layers.0.weight"] = state["layers.0.weight"] + 0.01
            time.sleep(0.5)
            t0 = time.perf_counter()
            pc.publish("big", {k: v2[k] for k in ["layers.0.weight"]}, base=1)
            wait_until(lambda: all_on(2), 300, 0.01, "v2 everywhere")
            delta_s = time.perf_counter() - t0
            time.sleep(0.5)
            t0 = time.perf_counter()
            pc.publish("big", state)  # a full sync under the light load too
            wait_until(lambda: all_on(3), 300, 0.01, "v3 everywhere")
            full_loaded_s = time.perf_counter() - t0
            stop.set()
            load.join(timeout=60)
        raw = raw_zmq_seconds(nbytes, 1 + args.workers)
        print(json.dumps({
            "model_mb": round(nbytes / 1e6, 1), "shards": args.shards, "workers": args.workers,
            "full_sync_s": round(full_s, 3), "full_publish_s": round(publish_s, 3),
            "full_sync_under_load_s": round(full_loaded_s, 3), "raw_zmq_s": round(raw, 3),
            "full_ratio": round(full_s / raw, 2), "delta_fraction": round(v2["layers.0.weight"].nbytes / nbytes, 4),
            "delta_sync_s": round(delta_s, 3), "failed_requests": failures[0],
        }))
    finally:
        for proc in reversed(procs):
            proc.stop()


if __name__ == "__main__":
    main()
