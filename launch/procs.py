"""Start and stop role processes: used by the local cluster, the benchmarks and the tests.

A role that binds sockets prints one line ``RINGSERVE_READY {json}`` on stdout once bound
(ephemeral ports included), so whoever started it learns its endpoints without guessing.
Each child runs in its own session, so stop() can always take down the whole group, with
huge pages for glibc's large buffers (launch/memory.py's `large_buffer_env`).
After the ready line a daemon thread keeps reading the child's stdout (copying it to the log),
so a child that prints a lot never blocks on a full pipe. A child never outlives this process,
even a SIGKILLed one: it watches a pipe whose write end only this process holds (and, on Linux,
has PR_SET_PDEATHSIG), see launch/lifeline.py.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from ringserve.launch import lifeline as lifeline_mod
from ringserve.launch.memory import large_buffer_env

READY_PREFIX = "RINGSERVE_READY "


def announce(info: dict) -> None:
    print(READY_PREFIX + json.dumps(info), flush=True)


class RoleProcess:
    def __init__(self, module: str, args: Sequence[str], log_path: str | os.PathLike | None = None,
                 wait_ready: bool = True, ready_timeout: float = 60.0, env: dict | None = None):
        self.module, self.args = module, list(args)
        self.log_path = Path(log_path) if log_path else None
        self._lifeline: int | None = None
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc, self._lifeline = popen_tied(module, self.args, stdout=subprocess.PIPE, stderr=self._log,
                                               start_new_session=True,
                                               env={**os.environ, **large_buffer_env(), **(env or {})})
        self.info: dict = {}
        self._pump: threading.Thread | None = None
        if wait_ready:
            self.wait_ready(ready_timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Block until the child announced itself; its info (endpoints, pid) is kept in .info."""
        self.info = self._read_ready(timeout)
        return self.info

    def _read_ready(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                lines = buf.split(b"\n")
                for k, line in enumerate(lines):
                    text = line.decode(errors="replace")
                    if text.startswith(READY_PREFIX) and k < len(lines) - 1:
                        self._start_pump(b"\n".join(lines[k + 1:]))
                        return json.loads(text[len(READY_PREFIX):])
                buf = buf[-65536:] if len(buf) > 1 << 20 else buf  # bounded while we wait
        self.stop()
        raise RuntimeError(f"{self.module} did not start (see {self.log_path}): {self.tail_log()}")

    def _start_pump(self, pending: bytes) -> None:
        """Drain the child's stdout for as long as it lives, so its writes never block."""
        self._pump = threading.Thread(target=_pump_stdout, args=(self.proc.stdout, self._log, pending),
                                      name=f"stdout-{self.pid}", daemon=True)
        self._pump.start()

    def tail_log(self, n: int = 20) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (graceful drain), then SIGKILL if it is still there after `timeout`."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if self.wait(timeout) is None:
                self.kill()
        if self._pump is not None:
            self._pump.join(timeout=2)  # the child is gone: its stdout ends, the pump returns
        if self.proc.stdout and (self._pump is None or not self._pump.is_alive()):
            self.proc.stdout.close()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
            self._log = subprocess.DEVNULL
        self._cut_lifeline()

    def _cut_lifeline(self) -> None:
        if self._lifeline is not None and self.proc.poll() is not None:
            os.close(self._lifeline)
            self._lifeline = None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(5)


def popen_tied(module: str, args: Sequence[str], **popen_kwargs) -> tuple[subprocess.Popen, int]:
    """Start ``python -m module args`` tied to this process (launch/lifeline.py): it stops when this
    process is gone, even SIGKILLed. Returns the child and the lifeline's write end, which this
    process keeps open while the child should live (close it once the child has exited)."""
    lifeline, write_end = os.pipe()  # the child sees end of file when every holder of write_end is gone
    env = dict(popen_kwargs.pop("env", None) or os.environ)
    env[lifeline_mod.PARENT_ENV] = str(os.getpid())
    # PDEATHSIG fires when the creating *thread* exits: ask for it only from the main thread
    env[lifeline_mod.PDEATHSIG_ENV] = "1" if threading.current_thread() is threading.main_thread() else "0"
    try:
        proc = subprocess.Popen([sys.executable, "-m", "ringserve.launch.lifeline", str(lifeline), module, *args],
                                pass_fds=(lifeline,), env=env, **popen_kwargs)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(lifeline)
    return proc, write_end


def _pump_stdout(stream, log, pending: bytes) -> None:
    """Copy a child's stdout to its log (or discard it) until end of file."""
    fd = stream.fileno()
    try:
        if pending and log is not subprocess.DEVNULL:
            log.write(pending)
        while chunk := os.read(fd, 65536):
            if log is not subprocess.DEVNULL and not log.closed:
                log.write(chunk)
                log.flush()
    except (OSError, ValueError):  # the pipe or log was closed under us: nothing left to copy
        pass


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until truthy (bounded in time); return its value or raise TimeoutError."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_for_workers(admin_address: str, count: int, timeout: float = 60.0, model: str | None = None,
                     version: int | None = None, security=None) -> dict:
    """Wait until the master lists `count` ready workers (serving `model` at `version` if given)."""
    from ringserve.client.admin import AdminClient

    admin = AdminClient(admin_address, timeout=2.0, security=security)

    def enough():
        st = admin.status()
        ok = [w for w in st["workers"] if w["state"] != "draining" and all(
            i.get("ready", True) and (version is None or i.get("version") == version)
            for m, i in w["models"].items() if model is None or m == model) and (model is None or model in w["models"])]
        return st if len(ok) >= count else None

    return wait_until(enough, timeout, 0.1, f"{count} workers at {admin_address}")


def free_tcp_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free on `host` right now, for roles that must know each other's endpoints before they
    start (active masters name their peers): bound together, then released."""
    import socket

    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
