"""ringserve-local: a whole cluster on this machine, on an embedded default.

Starts a master and N workers serving the demo MLP and CNN (weights written to a temporary
safetensors file from a fixed seed), sends real requests, prints each result beside the
same model run in-process, prints the admin status table, then stops everything.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from client import Client
from client.admin import AdminClient, format_status
from launch.procs import RoleProcess, wait_for_workers
from worker import demo


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringserve-local", description=__doc__)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--requests", type=int, default=16, help="requests per model")
    p.add_argument("--policy", default="least-outstanding")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--workdir", default=None, help="where weights and logs go (default: a temp dir)")
    return p


def write_demo_weights(workdir: Path) -> dict[str, Path]:
    paths = {}
    for name, factory in (("mlp", demo.mlp), ("cnn", demo.cnn)):
        path = workdir / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in factory(seed=7).state_dict().items()}, str(path))
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ringserve-local-"))
    workdir.mkdir(parents=True, exist_ok=True)
    weights = write_demo_weights(workdir)
    print(f"workdir: {workdir} (logs and weights)")
    procs: list[RoleProcess] = []
    try:
        master = RoleProcess("launch.master", ["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                                               "--admin", "tcp://127.0.0.1:*", "--policy", args.policy],
                             workdir / "master.log")
        procs.append(master)
        print(f"master: {master.info['frontend']} (clients), {master.info['admin']} (admin)")
        for i in range(args.workers):
            procs.append(RoleProcess("launch.worker", [
                "--master", master.info["backend"], "--name", f"worker-{i}", "--threads", "1",
                "--max-batch-size", str(args.max_batch_size),
                "--model", f"mlp=worker.demo:mlp,weights={weights['mlp']}",
                "--model", f"cnn=worker.demo:cnn,weights={weights['cnn']}"], workdir / f"worker-{i}.log"))
        wait_for_workers(master.info["admin"], args.workers, timeout=60)
        run_requests(master.info["frontend"], args.requests)
        time.sleep(1.1)  # one heartbeat, so the batch figures in the table are current
        print()
        print(format_status(AdminClient(master.info["admin"]).status()))
        return 0
    finally:
        for p in reversed(procs):
            p.stop()


def run_requests(address: str, count: int) -> None:
    rng = np.random.default_rng(0)
    reference = {"mlp": demo.mlp(seed=7).eval(), "cnn": demo.cnn(seed=7).eval()}
    inputs = {"mlp": ("x", lambda: rng.standard_normal((1, 256), dtype=np.float32)),
              "cnn": ("image", lambda: rng.standard_normal((1, 1, 28, 28), dtype=np.float32))}
    with Client(address, timeout=10) as client:
        for model, (name, make) in inputs.items():
            batch = [make() for _ in range(count)]
            t0 = time.perf_counter()
            futures = [client.infer_async(model, {name: x}) for x in batch]
            replies = [f.result() for f in futures]
            took = time.perf_counter() - t0
            with torch.inference_mode():
                expect = [reference[model](**{name: torch.from_numpy(x)})["logits"].numpy() for x in batch]
            worst = max(float(np.abs(r.outputs["logits"] - e).max()) for r, e in zip(replies, expect))
            for r in replies[:4]:
                print(f"{model} {r.id}: class={int(r.outputs['logits'].argmax())} worker={r.worker} "
                      f"batch_rows={r.header.get('batch_rows')}")
            print(f"{model}: {count} requests in {took * 1000:.1f} ms, max |ringserve - in-process| = {worst:.2e}")


if __name__ == "__main__":
    sys.exit(main())
