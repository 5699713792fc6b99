"""Fixtures that start real ringserve processes on 127.0.0.1 ephemeral ports and always stop them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import zmq

from ringserve.launch.procs import RoleProcess, wait_for_workers
from helpers import stop_together

EPHEMERAL = "tcp://127.0.0.1:*"
os.environ.setdefault("OMP_NUM_THREADS", "1")
TESTS = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's `--dist loadgroup` (setup.cfg), every test is sent to whichever test
    process is free, except that the tests of a file that share one of its module-scoped fixtures
    (a live cluster, a network-namespace deployment) stay together in one process, in file order:
    the fixture starts once and the tests that change its state still run one after another.
    A test may also name its own `xdist_group`; this only adds the file's group where none is set."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        info = getattr(item, "_fixtureinfo", None)
        for defs in (info.name2fixturedefs.values() if info else ()):
            fd = defs[-1]
            if fd.scope != "function" and _defined_in_tests(fd.func):
                item.add_marker(pytest.mark.xdist_group(item.path.name))
                break


def _defined_in_tests(func) -> bool:
    code = getattr(func, "__code__", None)
    return code is not None and Path(code.co_filename).resolve().is_relative_to(TESTS)


class Cluster:
    """A master and its workers; every process started here is stopped by `stop_all`."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[RoleProcess] = []
        self.master: RoleProcess | None = None
        self.workers: list[RoleProcess] = []
        self.shards: dict[str, RoleProcess] = {}

    def start_master(self, *args: str, endpoints: dict | None = None) -> RoleProcess:
        ep = endpoints or {"frontend": EPHEMERAL, "backend": EPHEMERAL, "admin": EPHEMERAL}
        self.master = self._start("ringserve.launch.master", ["--frontend", ep["frontend"], "--backend", ep["backend"],
                                                    "--admin", ep["admin"], "--heartbeat-interval", "0.2",
                                                    *args], "master")
        return self.master

    def start_workers(self, count: int, *args: str, names: list[str] | None = None, wait: bool = True,
                      model: str = "mlp=ringserve.worker.demo:mlp") -> list[RoleProcess]:
        names = names or [f"w{len(self.workers) + i}" for i in range(count)]
        started = [self._start("ringserve.launch.worker", ["--master", self.master.info["backend"], "--name", name,
                                                 "--threads", "1", "--heartbeat-interval", "0.2",
                                                 "--model", model, *args], name, wait_ready=False)
                   for name in names]
        for p in started:
            p.wait_ready(90)
        self.workers += started
        if wait:
            wait_for_workers(self.admin, len(self.workers), timeout=60)
        return started

    def _start(self, module: str, args: list[str], label: str, wait_ready: bool = True) -> RoleProcess:
        proc = RoleProcess(module, args, self.tmp / f"{label}-{len(self.procs)}.log", wait_ready=False)
        self.procs.append(proc)
        if wait_ready:
            proc.wait_ready(60)
        return proc

    def start_shards(self, count: int, endpoints: dict | None = None, prefix: str = "ps",
                     extra: tuple[str, ...] = ()) -> dict[str, str]:
        """Start `count` shards (data under tmp/<name>); return {name: endpoint} (the ring's shard list)."""
        started = {}
        for i in range(count):
            name = f"{prefix}{i}"
            bind = (endpoints or {}).get(name, {}).get("endpoint", EPHEMERAL)
            pub = (endpoints or {}).get(name, {}).get("pub", EPHEMERAL)
            started[name] = self._start("ringserve.launch.ps", ["--name", name, "--data-dir", str(self.tmp / name),
                                                      "--bind", bind, "--pub", pub, "--announce-interval", "0.2", *extra],
                                        name, wait_ready=False)
        for p in started.values():
            p.wait_ready(60)
        self.shards.update(started)
        return {n: p.info["endpoint"] for n, p in started.items()}

    @property
    def frontend(self) -> str:
        return self.master.info["frontend"]

    @property
    def admin(self) -> str:
        return self.master.info["admin"]

    def check_books(self, timeout: float = 10.0) -> dict:
        """The invariant fault and fuzz tests end with: once every request is answered, no worker
        credit slot is held by anything (the master's books balance: Broker.books)."""
        from ringserve.client.admin import AdminClient
        from ringserve.launch.procs import wait_until

        admin = AdminClient(self.admin)
        wait_until(lambda: admin.status()["books"]["pending"] == 0, timeout, 0.05, "every request answered")
        books = admin.status()["books"]
        assert books["ok"] and books["leaked"] == 0 and books["in_flight"] == 0, books
        return books

    def stop_all(self) -> None:
        """SIGTERM to every process first, then each stopped as before (SIGKILL 3 s after its
        SIGTERM at the latest): they wind down together, not one after another (a shard's repair
        round waits up to 2 s on a peer that already left, so one by one that added up)."""
        stop_together(self.procs)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def broker():
    """A real Broker on ephemeral loopback ports whose loop the test pumps by hand (see
    test_master_robustness.pump): fake workers and clients talk to it over real sockets."""
    import time

    from ringserve.master.broker import Broker, BrokerConfig

    ctx = zmq.Context()
    b = Broker(BrokerConfig(EPHEMERAL, EPHEMERAL, EPHEMERAL, policy="round-robin", heartbeat_interval=60.0, seed=1,
                            answer_cache_bytes=1 << 20, max_timeout=60.0), ctx)
    b.in_grace = False  # tests register their workers first
    b.last_heartbeat = time.monotonic()  # and the 60 s interval keeps heartbeats out of their way
    yield b
    b.close()
    ctx.destroy(linger=0)


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def raw_socket(ctx: zmq.Context, kind: int, address: str) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(address)
    return sock
