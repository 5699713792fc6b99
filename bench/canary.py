"""Traffic splits and metrics, measured on real processes; prints one JSON line.

A master with two workers serving mlp at versions 3 and 4 (weights from files labelled
version=3 / version=4), 2 shards with metrics on. Measures, in one run:
  split_error_pts     max |observed - configured| share over --requests requests, 3=90,4=10 (target <= 3)
  sticky_violations   users seen on more than one version under a sticky 50/50 route (target 0)
  metrics_families    distinct metric names scraped across master, workers and shards
  cold_load_ms        first request for a model not yet loaded (a worker with --max-models 1 serving
                      mlp and cnn from the shards), beside warm_ms, the same request once loaded
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ringserve.client import Client  # noqa: E402
from ringserve.client.admin import AdminClient  # noqa: E402
from ringserve.client.params import ParamClient  # noqa: E402
from ringserve.launch.logsetup import configure_logging  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_for_workers, wait_until  # noqa: E402
from ringserve.worker import demo  # noqa: E402

EPH = "tcp://127.0.0.1:*"


def families(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return {f.name for f in text_string_to_metric_families(r.read().decode())}


def run(client: Client, n: int, tags_of=lambda i: None) -> list[tuple[int, int]]:
    x = np.ones((1, 256), np.float32)
    out = []
    for start in range(0, n, 256):
        futs = [(i, client.infer_async("mlp", {"x": x}, tags=tags_of(i))) for i in range(start, min(n, start + 256))]
        out += [(i, f.result(timeout=60).version) for i, f in futs]
    return out


def cold_load(procs: list, shards: list, master, tmp: Path) -> tuple[float, float]:
    """Publish cnn, start an on-demand worker for it, time its first request and a warm one."""
    eps = ",".join(f"{s.info['name']}={s.info['endpoint']}" for s in shards)
    with ParamClient(eps) as pc:
        pc.publish("cnn", demo.cnn(seed=1).state_dict())
    w = RoleProcess("ringserve.launch.worker", ["--master", master.info["backend"], "--name", "lru", "--threads", "1",
                                                "--paramservers", eps, "--max-models", "1", "--metrics-port", "0",
                                                "--log-level", "warning", "--model", "cnn=ringserve.worker.demo:cnn"],
                    tmp / "lru.log")
    procs.append(w)
    admin = AdminClient(master.info["admin"])
    wait_until(lambda: any(x["name"] == "lru" for x in admin.status()["workers"]), 60)
    image = {"image": np.ones((1, 1, 28, 28), np.float32)}
    with Client(master.info["frontend"], timeout=60) as c:
        t0 = time.perf_counter()
        c.infer("cnn", image)
        cold = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        c.infer("cnn", image)
        return cold, (time.perf_counter() - t0) * 1000


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--users", type=int, default=500)
    args = p.parse_args(argv)
    configure_logging("bench", "warning")
    tmp = Path(tempfile.mkdtemp(prefix="rs-canary-"))
    procs: list[RoleProcess] = []
    try:
        shards = [RoleProcess("ringserve.launch.ps", ["--name", f"ps{i}", "--data-dir", str(tmp / f"ps{i}"), "--bind",
                                                       EPH, "--pub", EPH, "--metrics-port", "0", "--log-level",
                                                       "warning"], tmp / f"ps{i}.log") for i in range(2)]
        procs += shards
        master = RoleProcess("ringserve.launch.master", ["--frontend", EPH, "--backend", EPH, "--admin", EPH,
                                                         "--metrics-port", "0", "--log-level", "warning"],
                             tmp / "master.log")
        procs.append(master)
        for version in (3, 4):
            path = tmp / f"v{version}.safetensors"
            save_file({k: v.contiguous() for k, v in demo.mlp(seed=version).state_dict().items()}, str(path))
            procs.append(RoleProcess("ringserve.launch.worker", [
                "--master", master.info["backend"], "--name", f"w{version}", "--threads", "1", "--metrics-port", "0",
                "--max-batch-size", "32", "--log-level", "warning",
                "--model", f"mlp=ringserve.worker.demo:mlp,weights={path},version={version}"], tmp / f"w{version}.log"))
        wait_for_workers(master.info["admin"], 2, 60)
        admin = AdminClient(master.info["admin"])
        with Client(master.info["frontend"], timeout=60) as c:
            assert admin.route("mlp", split="3=90,4=10")["ok"]
            seen = Counter(v for _, v in run(c, args.requests))
            split_error = max(abs(seen[3] / args.requests * 100 - 90), abs(seen[4] / args.requests * 100 - 10))
            assert admin.route("mlp", split="3=50,4=50", sticky_key="user")["ok"]
            by_user = defaultdict(set)
            for i, v in run(c, args.requests, tags_of=lambda i: {"user": f"u{i % args.users}"}):
                by_user[i % args.users].add(v)
        cold_ms, warm_ms = cold_load(procs, shards, master, tmp)
        names = set().union(*(families(p.info["metrics"]) for p in procs if p.info.get("metrics")))
        print(json.dumps({"requests": args.requests, "observed_v3_pct": round(seen[3] / args.requests * 100, 2),
                          "split_error_pts": round(split_error, 2),
                          "sticky_violations": sum(1 for vs in by_user.values() if len(vs) > 1),
                          "sticky_users": len(by_user), "metrics_families": len(names), "cold_load_ms": round(cold_ms, 1),
                          "warm_ms": round(warm_ms, 2)}))
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    main()
