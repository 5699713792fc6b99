"""ringserve across hosts: docs/deployment.md's deployment in network namespaces, with keys, under faults.

    sudo python bench/multihost.py [--requests 600] [--rate 100]      (or python -m bench.multihost)

prints one JSON line: ``requests``, ``lost`` (requests without their right answer: none, a typed
error or a wrong output), ``duplicated`` (second answers the client dropped), ``p99_ms_delayed`` (p99
latency with a 50 ms-per-direction delaying proxy on one worker host's path) and ``redispatch_s``
(the longest wait of a request in flight when a worker host was cut off, which the master had to
re-dispatch after the liveness), plus the details: ``shard_cut_sync_s`` (from unplugging the ps1
host in the middle of both workers' full sync of a new version to both serving it, what ps1 owed
fetched from ps0) and ``shard_cut_failovers``. Phases, each under load: delayed path, worker host
cut off, shard host cut off mid-sync, then the new version checked bit-exact. Needs root
(network namespaces) and openssl (the metrics certificates of the docs' files).

Hosts (bench/netns.py: namespaces on one bridge, 10.77.0.0/24, nothing in the root namespace):
``master`` (master, 0.0.0.0:5555-5557), ``ps0`` and ``ps1`` (a shard each, 0.0.0.0:5600/5610,
told the ring and R = 2: every piece is on both hosts), ``gpu1`` and ``gpu2`` (a worker each; gpu1
reaches the master through bench/tcpproxy.py on its own host), ``client`` (the load driver, the
operator's publish and admin tools). Every role runs from a TOML file written the way
docs/deployment.md writes it, with CURVE keys made by ``ringserve-keys``; each host holds the
public keys and only its own secrets.

The client host's commands (the load drivers, ringserve-publish, ringserve-admin) are forked by
bench/forkrun.py there, each a process of its own, from an interpreter that imported torch once.
The load driver (``python -m bench.multihost drive ...``) sends requests open-loop at a fixed rate
and writes what happened to each one (sent, answered, by which worker and version, right or
wrong) to a JSON file; tests/test_multihost.py reads those.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/multihost.py` too

from bench.forkrun import Forked  # noqa: E402
from bench.netns import Lab  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_until  # noqa: E402

HB = 0.2  # heartbeat interval of every role here; liveness 3: a silent worker is evicted after 0.6 s
LIVENESS = 3
SHARDS = ("ps0", "ps1")  # each on a host of its own, as in docs/deployment.md (replicas = 2 there)
WORKERS = ("gpu1", "gpu2")
PROXIED = "gpu1"  # the worker host whose path to the master runs through the misbehaving proxy
ECHO = "echo=ringserve.worker.demo:slow,arg.delay=0.002"
MLP = "mlp=ringserve.worker.demo:mlp"
MLP_SEED = 1  # the published weights: demo.mlp(seed=1)
# MKL picks its sgemm kernels by the alignment of the weights' memory (a received frame's is anyone's):
# in its compatible mode a worker's outputs are bit for bit the model's built here, so a test can say
# "the same weights" by comparing outputs exactly
COMPUTE_ENV = {"MKL_CBWR": "COMPATIBLE"}
CLIENT_PRELOAD = ",".join(["numpy", "torch", "safetensors.torch", "ringserve.client", "ringserve.client.admin",
                           "ringserve.launch.publish", "ringserve.launch.admin", "ringserve.worker.demo",
                           "bench.multihost"])  # what the client host's tools import (bench/forkrun.py)


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


DOCS = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
# What the test deployment sets over docs/deployment.md's files, and why: faults are detected within a
# second (heartbeats, announcements), CPU instead of GPUs, one thread per worker on a shared machine,
# the test's models, a worker name per host, a reconnect backoff short enough for a flapping link, and
# a request deadline that a loaded machine never meets by accident.
TUNING = {
    "master": {"heartbeat-interval": HB, "heartbeat-liveness": LIVENESS, "default-timeout": 20.0},
    "ps": {"announce-interval": HB},
    "worker": {"device": "cpu", "threads": 1, "heartbeat-interval": HB, "heartbeat-liveness": LIVENESS,
               "max-backoff": 1.0,
               # fetch after the commit, as test_shard_host_cut_off_during_sync cuts a shard in that fetch
               # (a prefetch during the stage would have every piece before its cut)
               "no-prefetch": True},
}


def docs_configs(text: str | None = None) -> dict[str, dict]:
    """The example's TOML files in docs/deployment.md: {"master", "ps0", "worker"} by file name (the
    heading names the host and path), and "ops" (the operator's ~/ringserve.toml)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    text = DOCS.read_text() if text is None else text
    blocks = re.findall(r"`[\w.]+:(?:/[\w.~-]+)*/([\w.-]+)\.toml`[^\n]*\n(?:[^\n]*\n)*?\n```toml\n(.*?)```", text, re.S)
    out = {name: tomllib.loads(body) for name, body in blocks}
    ops = re.search(r"~/ringserve\.toml`:\n\n```toml\n(.*?)```", text, re.S)
    if ops is None or not {"master", "ps0", "worker"} <= set(out):
        raise ValueError(f"{DOCS}: the example's master.toml, ps0.toml, worker.toml or ~/ringserve.toml is missing")
    out["ops"] = tomllib.loads(ops.group(1))
    return out


def localize(value, swaps: dict[str, str]):
    """A setting of the docs' files with its host names and paths replaced (`swaps`, longest first)."""
    if isinstance(value, dict):
        return {k: localize(v, swaps) for k, v in value.items()}
    if isinstance(value, list):
        return [localize(v, swaps) for v in value]
    if isinstance(value, str):
        for old in sorted(swaps, key=len, reverse=True):
            value = value.replace(old, swaps[old])
    return value


@dataclass
class Deployment:
    """The hosts, keys, configs and roles; `close()` (or the Lab's) removes all of it."""

    tmp: Path
    lab: Lab = field(init=False)
    keys: dict[str, Path] = field(default_factory=dict)  # host -> its keys directory
    configs: dict[str, Path] = field(default_factory=dict)
    roles: dict[str, RoleProcess | Forked] = field(default_factory=dict)
    mlp_version: int = 0  # the mlp version published last, and the seed of its weights (demo.mlp(seed))
    mlp_seed: int = MLP_SEED

    def __post_init__(self) -> None:
        self.docs = docs_configs()
        self.lab = Lab(self.tmp)

    def swaps(self, host: str) -> dict[str, str]:
        """The docs' host names -> this lab's addresses; their paths -> this host's keys, its
        /etc/ringserve (the metrics certificate and token) and tmp."""
        out = {f"{h}.example": self.addr(h) for h in self.lab.hosts}
        out.update({"/etc/ringserve/keys": str(self.keys[host]), "/etc/ringserve/": f"{self.tmp}/etc-{host}/",
                    "/home/op/ringserve-keys": str(self.keys["client"]), "/var/lib/ringserve/": f"{self.tmp}/"})
        return out

    def _make_metrics_tls(self) -> None:
        """Per host, what docs/deployment.md has each make for metrics beyond loopback: a self-signed
        certificate for its address (openssl, as an operator would) and a bearer token."""
        import secrets

        for host in self.lab.hosts:
            etc = self.tmp / f"etc-{host}"
            etc.mkdir(mode=0o700)
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-days", "1", "-subj", f"/CN={host}.example",
                            "-addext", f"subjectAltName=IP:{self.addr(host)}", "-keyout", str(etc / "metrics.key"),
                            "-out", str(etc / "metrics.crt")], check=True, capture_output=True, timeout=60)
            (etc / "metrics.token").write_text(secrets.token_hex(24) + "\n")

    def config(self, doc: str, host: str, role: str | None = None, **settings) -> dict:
        """docs/deployment.md's file `doc`, for `host`, with the test's TUNING for `role` and `settings` over it."""
        return {**localize(self.docs[doc], self.swaps(host)), **TUNING.get(role or doc, {}), **settings}

    # ---------------------------------------------------------------- set-up
    def up(self) -> "Deployment":
        """Every role started at once (each one's interpreter and imports take seconds on a busy
        machine; workers and tools retry until the master and the shards are there), then waited for."""
        for name in ("master", *SHARDS, *WORKERS, "client"):
            self.lab.add_host(name)
        self._make_keys()
        self._make_metrics_tls()
        starting = [*self._start_workers(), self._start_runner(), self._start_master(), *self._start_shards()]
        for label, proc in starting:
            proc.wait_ready(120)
            self.roles[label] = proc
        self.publish_mlp()
        self.wait_serving(WORKERS, ("echo", "mlp"))
        return self

    def addr(self, host: str) -> str:
        return self.lab.hosts[host].address

    @property
    def shard_list(self) -> str:
        """The ring every role is given (the docs' worker.toml's): one shard per host, each at its own address."""
        return localize(self.docs["worker"]["paramservers"], self.swaps("client"))

    def master_endpoint(self, socket: str) -> str:
        """Where another host reaches the master's `socket` (frontend, backend, admin): the docs' port."""
        return f"tcp://{self.addr('master')}:{self.docs['master'][socket].rsplit(':', 1)[1]}"

    @property
    def frontend(self) -> str:
        return self.master_endpoint("frontend")

    def _make_keys(self) -> None:
        """ringserve-keys as docs/security.md runs it (its main, in this process: no interpreter
        start per role); then each host gets public/ and its own secrets."""
        import contextlib
        import io

        from ringserve.launch import keys

        every = self.tmp / "keys-all"
        wanted = {"master": ["master"], "shard": list(SHARDS), "worker": list(WORKERS), "client": ["web"],
                  "admin": ["ops"], "publisher": ["ci"]}
        for role, names in wanted.items():
            with contextlib.redirect_stdout(io.StringIO()):
                if keys.main([str(every), "new", role, *names]) != 0:
                    raise RuntimeError(f"ringserve-keys new {role} failed")
        mine = {"master": [("master", "master")], **{n: [("shard", n)] for n in SHARDS},
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

    def _start_master(self) -> tuple[str, RoleProcess]:
        cfg = write_toml(self.tmp / "master.toml", self.config("master", "master"))
        self.configs["master"] = cfg
        return "master", self.lab.start("master", "ringserve.launch.master", ["--config", str(cfg)], "master",
                                        wait_ready=False)

    def _start_shards(self) -> list[tuple[str, RoleProcess]]:
        """ps0 and ps1, each on its own host, each told the ring and R (docs/deployment.md's ps0.toml;
        ps1's is the same with ps1 for ps0 in name and data-dir, as the docs say): every piece is on
        both, so either one alone serves a whole version."""
        started = []
        for name in SHARDS:
            doc = self.config("ps0", name, "ps")
            cfg = write_toml(self.tmp / f"{name}.toml", {
                **doc, "name": name, "data-dir": doc["data-dir"].replace("ps0", name)})
            self.configs[name] = cfg
            started.append((name, self.lab.start(name, "ringserve.launch.ps", ["--config", str(cfg)], name,
                                                 wait_ready=False)))
        return started

    def _start_workers(self) -> list[tuple[str, RoleProcess]]:
        from safetensors.torch import save_file

        from ringserve.worker import demo

        fixed = self.tmp / "echo.safetensors"  # echo's weights come from a file (it serves at once: version 0),
        save_file(demo.slow().state_dict(), str(fixed))  # mlp's from the shards
        echo = f"{ECHO},weights={fixed}"
        started = []
        for w in WORKERS:
            master = self.master_endpoint("backend")
            if w == PROXIED:
                master = self._start_proxy(w, master)
            cfg = write_toml(self.tmp / f"{w}.toml", self.config("worker", w, master=master, name=w,
                                                                 model=[echo, MLP]))
            self.configs[w] = cfg
            started.append((w, self.lab.start(w, "ringserve.launch.worker", ["--config", str(cfg)], w,
                                              wait_ready=False, env=COMPUTE_ENV)))
        return started

    def _start_runner(self) -> tuple[str, RoleProcess]:
        """The client host's fork server (bench/forkrun.py): the operator's tools and the load
        drivers run there as their own processes without paying for an interpreter and torch each."""
        self.runner_socket = self.tmp / "client-runner.sock"
        return "runner", self.lab.start("client", "bench.forkrun", ["--socket", str(self.runner_socket),
                                                                    "--preload", CLIENT_PRELOAD], "runner",
                                        wait_ready=False, env=COMPUTE_ENV)

    def on_client(self, module: str, argv: list[str], label: str) -> Forked:
        """`python -m module argv` on the client host (forked by the runner); stdout in
        tmp/label.out, stderr in tmp/label.log."""
        return Forked(self.runner_socket, module, argv, self.tmp / f"{label}.out", self.tmp / f"{label}.log")

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
            ops = self.config("ops", "client")
            top = {k: v for k, v in ops.items() if not isinstance(v, dict)}
            self.configs["ops"] = write_toml(self.tmp / "ringserve.toml", top,
                                             {k: v for k, v in ops.items() if isinstance(v, dict)})
        return self.configs["ops"]

    def start_publish(self, seed: int) -> tuple[Forked, int]:
        """ringserve-publish from the client host, not waited for: demo.mlp(seed=seed)'s weights as
        the next version (every tensor differs from another seed's: a worker's sync of it is a full one).
        Returns the command and the version it publishes."""
        from safetensors.torch import save_file

        from ringserve.worker import demo

        weights = self.tmp / f"mlp-seed{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in demo.mlp(seed=seed).state_dict().items()}, str(weights))
        version = self.mlp_version + 1
        return self.on_client("ringserve.launch.publish", ["--config", str(self.ops_config()), "--model", "mlp",
                                                           "--weights", str(weights), "--version", str(version)],
                              f"publish-v{version}"), version

    def finish_publish(self, cmd: Forked, version: int, seed: int, timeout: float = 120.0) -> None:
        rc = cmd.wait(timeout)
        if rc != 0:
            cmd.kill()
            raise RuntimeError(f"publish of v{version} failed (rc {rc}): {cmd.tail_log(30)}")
        self.mlp_version, self.mlp_seed = version, seed

    def publish_mlp(self, seed: int = MLP_SEED) -> int:
        """Publish demo.mlp(seed=seed) as the next version and wait for the command (it waits for a
        worker to load it); returns the version."""
        cmd, version = self.start_publish(seed)
        self.finish_publish(cmd, version, seed)
        return version

    def publish_cutting_shard(self, shard: str = "ps1", cap: str = "20mbit", timeout: float = 60.0) -> dict:
        """Publish the next mlp version (another seed: every tensor differs, a full sync) with `shard`'s
        link capped at `cap` (tc tbf: its share takes the workers a second or two), and unplug `shard`
        as soon as every worker has the version's manifests. Returns the version, the workers that had
        every piece before the cut (`early`: the cut missed their sync), each worker's failovers for
        the version (`failovers`, from its log) and `sync_s`, from the cut to every worker serving it.
        The link stays cut and capped: the caller plugs it back in."""
        self.lab.shape(shard, cap)
        marks = {w: self.log_size(w) for w in WORKERS}
        seed = self.mlp_seed + 1
        publish, version = self.start_publish(seed)

        def logged(w: str, event: str) -> list[dict]:
            return [e for e in self.log_events(w, event, marks[w]) if e.get("version") == version]
        try:
            wait_until(lambda: all(logged(w, "weights_manifest_fetched") for w in WORKERS), timeout, 0.02,
                       f"every worker holds v{version}'s manifests")
        except TimeoutError:
            publish.kill()
            raise
        self.lab.cut(shard)
        cut_at = time.monotonic()
        early = [w for w in WORKERS if logged(w, "weights_pieces_fetched")]
        try:
            wait_until(lambda: all(str(w["models"]["mlp"]["state"]) == f"ready v{version}"
                                   for w in self.status()["workers"]), timeout, 0.05,
                       f"every worker serving mlp v{version}")
        except TimeoutError:
            publish.kill()
            raise
        sync_s = round(time.monotonic() - cut_at, 3)
        self.finish_publish(publish, version, seed)  # a worker loaded it: the publisher hears so from the others
        return {"version": version, "early": early, "sync_s": sync_s,
                "failovers": {w: logged(w, "weights_fetch_failover") for w in WORKERS}}

    # ----------------------------------------------------------------- admin
    def status(self, timeout: float = 10.0) -> dict:
        """The master's status as the operator's AdminClient on the client host sees it, through a
        long-lived agent there (a Unix socket in tmp: reachable from this namespace, and no
        interpreter start per call); `status_cli` is the same through ringserve-admin."""
        import socket

        if "agent" not in self.roles:
            sock_path = self.tmp / "admin-agent.sock"
            agent = self.on_client("bench.multihost", [
                "admin-agent", "--admin", self.master_endpoint("admin"),
                "--keys", str(self.keys["client"]), "--socket", str(sock_path)], "admin-agent")
            agent.wait_ready(60)
            self.roles["agent"] = agent
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
        cmd = self.on_client("ringserve.launch.admin", ["--config", str(self.ops_config()), "status", "--json"],
                             "admin-status")
        rc = cmd.wait(timeout)
        if rc != 0:
            cmd.kill()
            raise RuntimeError(f"admin status failed (rc {rc}): {cmd.tail_log()}")
        return json.loads(cmd.output())

    def serving(self, models: tuple[str, ...] = ("echo",)) -> set[str]:
        """Names of the registered workers on which every one of `models` is ready."""
        try:
            st = self.status()
        except (RuntimeError, OSError, json.JSONDecodeError):
            return set()
        return {w["name"] for w in st["workers"] if w.get("state") == "ready"
                and all(str(w["models"].get(m, {}).get("state", "")).startswith("ready") for m in models)}

    def wait_serving(self, workers, models=("echo",), timeout: float = 60.0) -> None:
        wait_until(lambda: set(workers) <= self.serving(models), timeout, 0.1, f"{sorted(workers)} serving {models}")

    def wait_gone(self, worker: str, timeout: float = 20.0) -> None:
        wait_until(lambda: worker not in self.serving(()), timeout, 0.1, f"{worker} evicted")

    def log_events(self, label: str, event: str, since: int = 0) -> list[dict]:
        """The JSON log events named `event` in tmp/label.log from byte `since` on."""
        with open(self.tmp / f"{label}.log", "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            if f'"{event}"' in line:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("event") == event:
                    out.append(rec)
        return out

    def log_size(self, label: str) -> int:
        return (self.tmp / f"{label}.log").stat().st_size

    # ------------------------------------------------------------------ load
    def drive(self, label: str, requests: int, rate: float, model: str = "echo", timeout: float = 30.0,
              seed: int | None = None, exact: bool = False) -> "Drive":
        """Load from the client host, open loop at `rate` (`exact`: mlp, one request at a time, each
        output bit-equal to the model built here); returns once its first request is answered."""
        out = self.tmp / f"drive-{label}.json"
        args = ["drive", "--frontend", self.frontend, "--keys", str(self.keys["client"]), "--model", model,
                "--seed", str(self.mlp_seed if seed is None else seed), *(["--exact"] if exact else []),
                "--requests", str(requests), "--rate", str(rate), "--timeout", str(timeout), "--out", str(out)]
        proc = self.on_client("bench.multihost", args, f"drive-{label}")
        proc.wait_ready(90)
        return Drive(proc, out)

    def close(self) -> None:
        self.lab.close()


@dataclass
class Drive:
    proc: Forked
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
        torch.set_num_threads(1)  # as the workers run it (threads = 1): the same kernels, the same bits
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
            if args.exact:  # one at a time: every request a batch of its own, computed as here
                try:
                    f.result(timeout=args.timeout + 5)
                except Exception:  # noqa: BLE001 - read again (and recorded) below
                    pass
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
            if expect and not args.exact:  # a batch of several computes each row in another order
                right = np.allclose(got, want, rtol=1e-4, atol=1e-5)
            else:
                right = np.array_equal(got, want)
            rec.update(outcome="ok" if right else "wrong", worker=reply.worker, version=reply.version)
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
        "by_version": {str(v): sum(r.get("version") == v for r in records)
                       for v in {r.get("version") for r in records} if v is not None},
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
        run = dep.drive("shard-cut", requests, rate)  # ps1 unplugged in the middle of both workers' full sync
        sync = dep.publish_cutting_shard("ps1")
        shard_cut = run.result()
        dep.lab.restore("ps1")
        dep.lab.unshape("ps1")
        exact = dep.drive("exact", 40, rate, model="mlp", exact=True).result()  # the new version, bit-exact
        runs = (delayed["summary"], cut["summary"], shard_cut["summary"], exact["summary"])
        return {
            "requests": sum(s["requests"] for s in runs),
            "lost": sum(s["lost"] + s["errors"] + s["wrong"] for s in runs),
            "duplicated": sum(s["duplicated"] for s in runs),
            "p99_ms_delayed": delayed["summary"]["p99_ms"],
            "redispatch_s": redispatch_s(cut["records"], cut_at, gone_at),
            "p99_ms_cut": cut["summary"]["p99_ms"],
            "shard_cut_sync_s": sync["sync_s"],
            "shard_cut_failovers": sum(map(len, sync["failovers"].values())),
            "p99_ms_shard_cut": shard_cut["summary"]["p99_ms"],
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
    d.add_argument("--exact", action="store_true",
                   help="one request at a time, each output bit-equal to the model's here (else mlp: allclose)")
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
