"""ringserve across hosts: docs/deployment.md's deployment in network namespaces, with keys, under faults.

    sudo python -m bench.multihost [--requests 600] [--rate 100]

prints one JSON line: ``requests``, ``lost`` (requests without their right answer: none, a typed
error or a wrong output), ``duplicated`` (second answers the client dropped), ``p99_ms_delayed`` (p99
latency with a 50 ms-per-direction delaying proxy on one worker host's path) and ``redispatch_s``
(the longest wait of a request in flight when a worker host was cut off, which the master had to
re-dispatch after the liveness), plus the details. Needs root (network namespaces).

Hosts (bench/netns.py: namespaces on one bridge, 10.77.0.0/24, nothing in the root namespace):
``master`` (master, 0.0.0.0:5555-5557), ``shards`` (ps0, ps1), ``gpu1`` and ``gpu2`` (a worker
each; gpu1 reaches the master through bench/tcpproxy.py on its own host), ``client`` (the load
driver, the operator's publish and admin tools). Every role runs from a TOML file written the way
docs/deployment.md writes it, with CURVE keys made by ``ringserve-keys``; each host holds the
public keys and only its own secrets.

The load driver (``python -m bench.multihost drive ...``, run inside the client's namespace)
sends requests open-loop at a fixed rate and writes what happened to each one (sent, answered,
by which worker, right or wrong) to a JSON file; tests/test_multihost.py reads those.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.netns import Lab
from ringserve.launch.procs import RoleProcess, wait_until

HB = 0.2  # heartbeat interval of every role here; liveness 3: a silent worker is evicted after 0.6 s
LIVENESS = 3
PORTS = {"frontend": 5555, "backend": 5556, "admin": 5557}
SHARDS = {"ps0": (5600, 5610), "ps1": (5601, 5611)}
WORKERS = ("gpu1", "gpu2")
PROXIED = "gpu1"  # the worker host whose path to the master runs through the misbehaving proxy
ECHO = "echo=ringserve.worker.demo:slow,arg.delay=0.002"
MLP = "mlp=ringserve.worker.demo:mlp"
MLP_SEED = 1  # the published weights: demo.mlp(seed=1)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a TOML basic string


def write_toml(path: Path, settings: dict, tables: dict | None = None) -> Path:
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    for table, body in (tables or {}).items():
        lines += ["", f"[{table}]", *(f"{k} = {toml_value(v)}" for k, v in body.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Deployment:
    """The hosts, keys, configs and roles; `close()` (or the Lab's) removes all of it."""

    tmp: Path
    lab: Lab = field(init=False)
    keys: dict[str, Path] = field(default_factory=dict)  # host -> its keys directory
    configs: dict[str, Path] = field(default_factory=dict)
    roles: dict[str, RoleProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lab = Lab(self.tmp)

    # ---------------------------------------------------------------- set-up
    def up(self) -> "Deployment":
        for name in ("master", "shards", *WORKERS, "client"):
            self.lab.add_host(name)
        self._make_keys()
        self._start_master()
        self._start_shards()
        self._start_workers()
        self.publish_mlp()
        self.wait_serving(WORKERS, ("echo", "mlp"))
        return self

    def addr(self, host: str) -> str:
        return self.lab.hosts[host].address

    @property
    def shard_list(self) -> str:
        return ",".join(f"{n}=tcp://{self.addr('shards')}:{p}" for n, (p, _) in SHARDS.items())

    @property
    def frontend(self) -> str:
        return f"tcp://{self.addr('master')}:{PORTS['frontend']}"

    def _make_keys(self) -> None:
        """ringserve-keys as docs/security.md runs it; then each host gets public/ and its own secrets."""
        every = self.tmp / "keys-all"
        wanted = {"master": ["master"], "shard": list(SHARDS), "worker": list(WORKERS), "client": ["web"],
                  "admin": ["ops"], "publisher": ["ci"]}
        for role, names in wanted.items():
            subprocess.run([sys.executable, "-m", "ringserve.launch.keys", str(every), "new", role, *names],
                           check=True, capture_output=True, timeout=60)
        mine = {"master": [("master", "master")], "shards": [("shard", n) for n in SHARDS],
                "client": [("client", "web"), ("admin", "ops"), ("publisher", "ci")],
                **{w: [("worker", w)] for w in WORKERS}}
        for host, secrets in mine.items():
            d = self.keys[host] = self.tmp / f"keys-{host}"
            shutil.copytree(every / "public", d / "public")
            for role, name in secrets:
                (d / "secret" / role).mkdir(parents=True, exist_ok=True, mode=0o700)
                dst = d / "secret" / role / f"{name}.key_secret"
                shutil.copy2(every / "secret" / role / f"{name}.key_secret", dst)
            for sub in (d / "secret", *(d / "secret").iterdir()):
                sub.chmod(0o700)

    def _start_master(self) -> None:
        cfg = write_toml(self.tmp / "master.toml", {
            **{k: f"tcp://0.0.0.0:{p}" for k, p in PORTS.items()},
            "keys": str(self.keys["master"]), "state-dir": str(self.tmp / "master-state"),
            "policy": "least-outstanding", "max-queue": 2000, "default-timeout": 20.0,
            "heartbeat-interval": HB, "heartbeat-liveness": LIVENESS, "log-level": "info"})
        self.configs["master"] = cfg
        self.roles["master"] = self.lab.start("master", "ringserve.launch.master", ["--config", str(cfg)], "master")

    def _start_shards(self) -> None:
        started = []
        for name, (port, pub) in SHARDS.items():
            cfg = write_toml(self.tmp / f"{name}.toml", {
                "name": name, "data-dir": str(self.tmp / name), "bind": f"tcp://0.0.0.0:{port}",
                "pub": f"tcp://0.0.0.0:{pub}", "keys": str(self.keys["shards"]), "keep": 5,
                "announce-interval": HB})
            self.configs[name] = cfg
            started.append((name, self.lab.start("shards", "ringserve.launch.ps", ["--config", str(cfg)], name,
                                                 wait_ready=False)))
        for name, proc in started:
            proc.wait_ready(90)
            self.roles[name] = proc

    def _start_workers(self) -> None:
        from safetensors.torch import save_file

        from ringserve.worker import demo

        fixed = self.tmp / "echo.safetensors"  # echo's weights come from a file (it serves at once: version 0),
        save_file(demo.slow().state_dict(), str(fixed))  # mlp's from the shards
        echo = f"{ECHO},weights={fixed}"
        started = []
        for w in WORKERS:
            master = f"tcp://{self.addr('master')}:{PORTS['backend']}"
            if w == PROXIED:
                master = self._start_proxy(w, master)
            cfg = write_toml(self.tmp / f"{w}.toml", {
                "master": master, "name": w, "device": "cpu", "threads": 1, "max-batch-size": 8,
                "paramservers": self.shard_list, "keys": str(self.keys[w]), "heartbeat-interval": HB,
                "heartbeat-liveness": LIVENESS, "max-backoff": 1.0, "model": [echo, MLP]})
            self.configs[w] = cfg
            started.append((w, self.lab.start(w, "ringserve.launch.worker", ["--config", str(cfg)], w,
                                              wait_ready=False)))
        for w, proc in started:
            proc.wait_ready(120)
            self.roles[w] = proc

    def _start_proxy(self, host: str, target: str) -> str:
        self.mode_file = self.tmp / "proxy.mode"
        self.set_proxy("pass")
        proxy = self.lab.start(host, "bench.tcpproxy", ["--listen", "127.0.0.1:0", "--target",
                                                        target.removeprefix("tcp://"),
                                                        "--mode-file", str(self.mode_file)], "proxy")
        self.roles["proxy"] = proxy
        return proxy.info["endpoint"]

    def set_proxy(self, mode: str) -> None:
        """'pass', 'delay MS', 'stall' or 'reset' (bench/tcpproxy.py reads it within 50 ms)."""
        tmp = self.mode_file.with_suffix(".tmp")
        tmp.write_text(mode + "\n")
        tmp.replace(self.mode_file)

    def ops_config(self) -> Path:
        if "ops" not in self.configs:
            self.configs["ops"] = write_toml(self.tmp / "ringserve.toml", {"keys": str(self.keys["client"])}, {
                "publish": {"shards": self.shard_list},
                "admin": {"master": f"tcp://{self.addr('master')}:{PORTS['admin']}", "shards": self.shard_list}})
        return self.configs["ops"]

    def publish_mlp(self, seed: int = MLP_SEED) -> None:
        """ringserve-publish from the client host: demo.mlp(seed=seed)'s weights as the next version."""
        from safetensors.torch import save_file

        from ringserve.worker import demo

        weights = self.tmp / f"mlp-seed{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in demo.mlp(seed=seed).state_dict().items()}, str(weights))
        out = self.lab.run("client", [sys.executable, "-m", "ringserve.launch.publish", "--config",
                                      str(self.ops_config()), "--model", "mlp", "--weights", str(weights)], timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"publish failed: {out.stderr.strip()[-2000:]}")

    # ----------------------------------------------------------------- admin
    def status(self, timeout: float = 10.0) -> dict:
        """The master's status as the operator's AdminClient on the client host sees it, through a
        long-lived agent there (a Unix socket in tmp: reachable from this namespace, and no
        interpreter start per call); `status_cli` is the same through ringserve-admin."""
        import socket

        if "agent" not in self.roles:
            sock_path = self.tmp / "admin-agent.sock"
            self.roles["agent"] = self.lab.start("client", "bench.multihost", [
                "admin-agent", "--admin", f"tcp://{self.addr('master')}:{PORTS['admin']}",
                "--keys", str(self.keys["client"]), "--socket", str(sock_path)], "admin-agent")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.tmp / "admin-agent.sock"))
            s.sendall(b"status\n")
            answer = json.loads(s.makefile().readline())
        if "error" in answer:
            raise RuntimeError(f"admin status failed: {answer['error']}")
        return answer

    def status_cli(self, timeout: float = 20.0) -> dict:
        """`ringserve-admin --config ~/ringserve.toml status --json`, from the client host."""
        out = self.lab.run("client", [sys.executable, "-m", "ringserve.launch.admin", "--config",
                                      str(self.ops_config()), "status", "--json"], timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"admin status failed: {out.stderr.strip()[-1000:]}")
        return json.loads(out.stdout)

    def serving(self, models: tuple[str, ...] = ("echo",)) -> set[str]:
        """Names of the registered workers on which every one of `models` is ready."""
        try:
            st = self.status()
        except (RuntimeError, OSError, json.JSONDecodeError):
            return set()
        return {w["name"] for w in st["workers"] if w.get("state") == "ready"
                and all(str(w["models"].get(m, {}).get("state", "")).startswith("ready") for m in models)}

    def wait_serving(self, workers, models=("echo",), timeout: float = 60.0) -> None:
        wait_until(lambda: set(workers) <= self.serving(models), timeout, 0.3, f"{sorted(workers)} serving {models}")

    def wait_gone(self, worker: str, timeout: float = 20.0) -> None:
        wait_until(lambda: worker not in self.serving(()), timeout, 0.2, f"{worker} evicted")

    # ------------------------------------------------------------------ load
    def drive(self, label: str, requests: int, rate: float, model: str = "echo", timeout: float = 30.0,
              seed: int = MLP_SEED) -> "Drive":
        out = self.tmp / f"drive-{label}.json"
        args = ["drive", "--frontend", self.frontend, "--keys", str(self.keys["client"]), "--model", model,
                "--seed", str(seed),
                "--requests", str(requests), "--rate", str(rate), "--timeout", str(timeout), "--out", str(out)]
        return Drive(self.lab.start("client", "bench.multihost", args, f"drive-{label}"), out)

    def close(self) -> None:
        self.lab.close()


@dataclass
class Drive:
    proc: RoleProcess
    out: Path

    def result(self, timeout: float = 90.0) -> dict:
        """Wait for the driver to finish; its report (summary and one record per request)."""
        rc = self.proc.wait(timeout)
        if rc is None:
            self.proc.kill()
            raise TimeoutError(f"load driver still running after {timeout}s: {self.proc.tail_log()}")
        if rc != 0 or not self.out.exists():
            raise RuntimeError(f"load driver failed (rc {rc}): {self.proc.tail_log()}")
        return json.loads(self.out.read_text())


# ---------------------------------------------------------------------- the driver
def run_driver(args: argparse.Namespace) -> int:
    """Open loop at `rate`: request i carries x = i; check every answer is its own; write the report."""
    import numpy as np

    from ringserve.client import Client
    from ringserve.client.errors import Timeout
    from ringserve.launch.procs import announce
    from ringserve.protocol.security import Security

    expect = None
    if args.model == "mlp":
        import torch

        from ringserve.worker import demo
        net = demo.mlp(seed=args.seed).eval()

        def expect(x):
            with torch.inference_mode():
                return net(torch.from_numpy(x))["logits"].numpy()

    def inputs(i: int) -> dict:
        if args.model == "mlp":
            return {"x": np.random.default_rng(i).standard_normal((1, 256), dtype=np.float32)}
        return {"x": np.full((1, 4), float(i), np.float32)}

    records: list[dict] = []
    with Client(args.frontend, timeout=args.timeout, retry_interval=0.2, max_retry_interval=1.0,
                ping_interval=0.2, security=Security(args.keys, "client")) as c:
        c.infer(args.model, inputs(0), timeout=args.timeout)  # connected and served once: the run may start
        announce({"driver": "running"})
        futures = []
        t0 = time.monotonic()
        for i in range(args.requests):
            delay = t0 + i / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            rec = {"i": i, "sent": time.time()}
            records.append(rec)
            f = c.infer_async(args.model, inputs(i), timeout=args.timeout)

            def done(f, rec=rec):
                rec["done"] = time.time()
            f.add_done_callback(done)
            futures.append(f)
        for i, (f, rec) in enumerate(zip(futures, records, strict=True)):
            try:
                reply = f.result(timeout=args.timeout + 5)
            except Timeout as exc:
                rec.update(outcome="lost", error=str(exc)[:200])
                continue
            except Exception as exc:  # noqa: BLE001 - a typed error is an answer, but not the right one
                rec.update(outcome="error", error=f"{type(exc).__name__}: {exc}"[:200])
                continue
            want = expect(inputs(i)["x"]) if expect else inputs(i)["x"]
            got = reply.outputs["logits" if expect else "y"]
            right = np.allclose(got, want, rtol=1e-4, atol=1e-5) if expect else np.array_equal(got, want)
            rec.update(outcome="ok" if right else "wrong", worker=reply.worker)
        stats = c.stats
    lat = sorted(r["done"] - r["sent"] for r in records if "done" in r)
    summary = {
        "requests": len(records),
        "ok": sum(r.get("outcome") == "ok" for r in records),
        "lost": sum(r.get("outcome") == "lost" for r in records),
        "errors": sum(r.get("outcome") == "error" for r in records),
        "wrong": sum(r.get("outcome") == "wrong" for r in records),
        "duplicated": stats.duplicates_dropped,
        "master_restarts": stats.master_restarts,
        "p50_ms": round(1000 * lat[len(lat) // 2], 2) if lat else None,
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2) if lat else None,
        "by_worker": {w: sum(r.get("worker") == w for r in records) for w in {r.get("worker") for r in records} if w},
    }
    Path(args.out).write_text(json.dumps({"summary": summary, "records": records}))
    return 0


def run_admin_agent(args: argparse.Namespace) -> int:
    """(inside the client's namespace) answer `status` on a Unix socket with the master's status."""
    import socketserver

    from ringserve.client.admin import AdminClient
    from ringserve.launch.procs import announce
    from ringserve.protocol.security import Security

    admin = AdminClient(args.admin, timeout=2.0, security=Security(args.keys, "admin"))

    class Handler(socketserver.StreamRequestHandler):
        timeout = 10

        def handle(self) -> None:
            if self.rfile.readline().strip() != b"status":
                return
            try:
                answer = admin.status()
            except Exception as exc:  # noqa: BLE001 - the caller gets the reason, the agent goes on
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            self.wfile.write(json.dumps(answer).encode() + b"\n")

    Path(args.socket).unlink(missing_ok=True)
    with socketserver.UnixStreamServer(args.socket, Handler) as server:
        announce({"agent": args.socket})
        server.serve_forever()
    return 0


def redispatch_s(records: list[dict], cut_at: float, gone_at: float) -> float:
    """How long a cut-off worker's requests waited for their answer: the longest wait of a request
    in flight across the cut (sent before the master saw the worker gone at `gone_at`, answered
    after `cut_at`). Those the worker held had to wait out the liveness and be re-dispatched."""
    waits = [r["done"] - r["sent"] for r in records if r["sent"] < gone_at and r.get("done", 0) > cut_at]
    return round(max(waits), 3) if waits else 0.0


# ---------------------------------------------------------------------- the benchmark
def bench(requests: int, rate: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="ringserve-multihost-"))
    dep = Deployment(tmp)
    try:
        dep.up()
        dep.set_proxy("delay 50")
        delayed = dep.drive("delayed", requests, rate).result()
        dep.set_proxy("pass")
        run = dep.drive("cut", requests, rate)
        time.sleep(requests / rate / 4)
        cut_at = time.time()
        dep.lab.cut("gpu2")
        dep.wait_gone("gpu2")
        gone_at = time.time()
        time.sleep(max(0.0, cut_at + HB * LIVENESS * 4 - time.time()))
        dep.lab.restore("gpu2")
        cut = run.result()
        dep.wait_serving(["gpu2"])
        runs = (delayed["summary"], cut["summary"])
        return {
            "requests": sum(s["requests"] for s in runs),
            "lost": sum(s["lost"] + s["errors"] + s["wrong"] for s in runs),
            "duplicated": sum(s["duplicated"] for s in runs),
            "p99_ms_delayed": delayed["summary"]["p99_ms"],
            "redispatch_s": redispatch_s(cut["records"], cut_at, gone_at),
            "p99_ms_cut": cut["summary"]["p99_ms"],
            "by_worker_delayed": delayed["summary"]["by_worker"],
        }
    finally:
        dep.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("drive", help="(inside the client's namespace) send load, write a report")
    d.add_argument("--frontend", required=True)
    d.add_argument("--keys", required=True)
    d.add_argument("--model", default="echo", choices=["echo", "mlp"])
    d.add_argument("--requests", type=int, default=300)
    d.add_argument("--rate", type=float, default=100.0)
    d.add_argument("--timeout", type=float, default=30.0)
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=MLP_SEED, help="mlp: the published weights are demo.mlp(seed=SEED)")
    a = sub.add_parser("admin-agent", help="(inside the client's namespace) serve the master's status on a Unix socket")
    a.add_argument("--admin", required=True)
    a.add_argument("--keys", required=True)
    a.add_argument("--socket", required=True)
    p.add_argument("--requests", type=int, default=600, help="requests per phase (delayed; cut off)")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second")
    args = p.parse_args(argv)
    if args.command == "drive":
        return run_driver(args)
    if args.command == "admin-agent":
        return run_admin_agent(args)
    from bench.netns import probe
    reason = probe()
    if reason:
        print(json.dumps({"skipped": reason}))
        return 2
    print(json.dumps(bench(args.requests, args.rate)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
