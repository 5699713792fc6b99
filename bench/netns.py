"""Several "hosts" on one machine: network namespaces joined by veth pairs to a bridge.

Used by tests/test_multihost.py and bench/multihost.py. Everything a `Lab` makes lives in
namespaces it created (names carry a per-run tag, so parallel runs and leftovers of a crashed
run never collide): the bridge sits in a namespace of its own (`<tag>-hub`), each host's
`eth0` is a veth whose peer is a bridge port there, and addresses (10.77.0.0/24 by default)
exist only inside those namespaces. The machine's own namespace gets nothing: no interface,
no address, no route, so no traffic of a test can leave the namespaces it made.

`Lab.close()` stops every process started through it and deletes every namespace (which
removes the veths and the bridge with them); it is safe to call twice and after a failure.

Links are cut on the hub side (`cut`/`restore`: the bridge port goes down, the host keeps
its address and sees no carrier), the way a pulled cable or a dead switch port looks.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ringserve.launch.procs import RoleProcess

NSEXEC = "bench.nsexec"  # python -m bench.nsexec NS MODULE ARGS...: runs MODULE inside NS


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip`, or the kernel refuses): callers skip."""


def _ip(*args: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=check)


def probe() -> str | None:
    """None when `ip netns` works here, else the reason it does not (for pytest.skip)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add is refused)"
    name = f"rsprobe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"ip netns add is refused: {getattr(exc, 'stderr', '') or exc}".strip()
    _ip("netns", "del", name, check=False)
    return None


@dataclass
class Host:
    name: str
    ns: str
    address: str
    port: str  # the bridge port for this host, in the hub namespace


@dataclass
class Lab:
    """Hosts on one bridge. `tag` prefixes every namespace; pass none for a fresh random one."""

    tmp: Path
    subnet: str = "10.77.0.0/24"
    tag: str = field(default_factory=lambda: f"rs{secrets.token_hex(3)}")
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[RoleProcess] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        reason = probe()
        if reason:
            raise NetnsUnavailable(reason)
        self.hub = f"{self.tag}-hub"
        self._addrs = ipaddress.ip_network(self.subnet).hosts()
        try:
            self._add_ns(self.hub)
            _ip("link", "add", "br0", "type", "bridge", ns=self.hub)
            _ip("link", "set", "br0", "up", ns=self.hub)
            _ip("link", "set", "lo", "up", ns=self.hub)
        except BaseException:
            self.close()  # a half-made lab leaves nothing behind either
            raise

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)

    def add_host(self, name: str) -> Host:
        """A namespace with lo and eth0 (the next address of the subnet), plugged into the bridge.
        (If this fails half-way, close() still removes the namespace and, with it, the veth.)"""
        ns = f"{self.tag}-{name}"
        self._add_ns(ns)
        port = f"p-{name}"[:15]
        addr = str(next(self._addrs))
        prefix = ipaddress.ip_network(self.subnet).prefixlen
        # Made in the hub, the peer created straight inside the host: nothing touches the root namespace.
        _ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=self.hub)
        _ip("link", "set", port, "master", "br0", ns=self.hub)
        _ip("link", "set", port, "up", ns=self.hub)
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("addr", "add", f"{addr}/{prefix}", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        host = self.hosts[name] = Host(name, ns, addr, port)
        return host

    # ------------------------------------------------------------------ links
    def cut(self, name: str) -> None:
        """Unplug a host: its bridge port goes down (no carrier; packets to and from it are lost)."""
        _ip("link", "set", self.hosts[name].port, "down", ns=self.hub)

    def restore(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].port, "up", ns=self.hub)

    def shape(self, name: str, rate: str = "20mbit") -> None:
        """Cap a host's outgoing bandwidth with a token bucket (tbf; this kernel has no netem)."""
        subprocess.run(["ip", "netns", "exec", self.hosts[name].ns, "tc", "qdisc", "replace", "dev", "eth0",
                        "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms"],
                       capture_output=True, text=True, timeout=10, check=True)

    def unshape(self, name: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.hosts[name].ns, "tc", "qdisc", "del", "dev", "eth0", "root"],
                       capture_output=True, text=True, timeout=10)  # none there: nothing to do

    # -------------------------------------------------------------- processes
    def start(self, host: str, module: str, args: Sequence[str], label: str, wait_ready: bool = True,
              ready_timeout: float = 90.0, env: dict[str, str] | None = None) -> RoleProcess:
        """`python -m module args` inside the host's namespace (with `env` added), stopped by close()."""
        env = {**(env or {}), "PYTHONPATH": os.pathsep.join(filter(None, [
            str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))}
        proc = RoleProcess(NSEXEC, [self.hosts[host].ns, module, *args], self.tmp / f"{label}.log",
                           wait_ready=False, env=env)
        self.procs.append(proc)
        if wait_ready:
            proc.wait_ready(ready_timeout)
        return proc

    def run(self, host: str, argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a command to its end inside the host's namespace (bounded by `timeout`)."""
        return subprocess.run(["ip", "netns", "exec", self.hosts[host].ns, *argv], capture_output=True,
                              text=True, timeout=timeout)

    # ---------------------------------------------------------------- cleanup
    def close(self) -> None:
        for p in self.procs:  # every role told at once, so their drains overlap
            try:
                p.signal(signal.SIGTERM)
            except OSError:
                pass
        for p in reversed(self.procs):
            try:
                p.stop(timeout=3)
            except Exception:  # noqa: BLE001 - keep going: every namespace must still go
                p.kill()
        self.procs.clear()
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)  # takes its veths (and the hub's bridge) with it
        self._made.clear()

    def leftovers(self) -> list[str]:
        """Namespaces of this lab that still exist (empty after close)."""
        out = _ip("netns", "list", check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(self.tag + "-")]

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
