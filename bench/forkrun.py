"""A fork server for one host of a Lab: `python -m MODULE ARGS` without a new interpreter each time.

    python -m bench.forkrun --socket PATH [--preload mod1,mod2,...]

On a machine whose two cores are shared, starting Python and importing torch takes 10-15 s;
a test that runs the operator's tools (ringserve-publish, ringserve-admin) and load drivers on
the client host a dozen times spent most of its time there. This process imports the modules
once, then, for each request on its Unix socket, forks a child that runs MODULE as ``__main__``
with ARGS (exactly what ``python -m MODULE ARGS`` runs, in a process of its own, in this
process's network namespace), its stdout and stderr in files. The connection stays open until
the child exits and then carries its exit status. Nothing but imports runs here before a fork
(no socket of ours but the Unix one, no zmq context). Children are in this process's group
(stopping it stops them) and die with it (PR_SET_PDEATHSIG).

Request (one JSON line): ``{"module": M, "argv": [...], "stdout": PATH, "stderr": PATH}``;
answers: ``{"pid": N}`` at once, ``{"rc": N}`` when the child is gone. `Forked` is the caller's side.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from ringserve.launch.procs import READY_PREFIX, announce

MAX_CHILDREN = 64
MAX_REQUEST = 64 << 10


def _child(request: dict) -> None:
    """(in the forked child) become `python -m module argv`; never returns."""
    code = 1
    try:
        from ringserve.launch.lifeline import set_pdeathsig

        set_pdeathsig(signal.SIGKILL)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
        sys.argv = [request["module"], *request["argv"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - the traceback goes to its stderr file, the status says 1
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _valid(request: object) -> dict | None:
    if not isinstance(request, dict):
        return None
    if not isinstance(request.get("module"), str) or not isinstance(request.get("argv"), list):
        return None
    if not all(isinstance(a, str) for a in request["argv"]):
        return None
    if not isinstance(request.get("stdout"), str) or not isinstance(request.get("stderr"), str):
        return None
    return request


def serve(path: str) -> None:
    """Accept requests until killed; fork one child per request, report each one's exit status."""
    Path(path).unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    children: dict[int, socket.socket] = {}  # pid -> the connection waiting for its status
    announce({"forkrun": path, "pid": os.getpid()})
    while True:
        ready, _, _ = select.select([listener], [], [], 0.05)
        if ready and len(children) < MAX_CHILDREN:
            conn, _ = listener.accept()
            conn.settimeout(5)
            try:
                line = conn.makefile("rb").readline(MAX_REQUEST)
                request = _valid(json.loads(line))
            except (OSError, ValueError):
                request = None
            if request is None:
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                for sock in (listener, conn, *children.values()):
                    sock.close()
                _child(request)
            children[pid] = conn
            try:
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            except OSError:
                pass
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"rc": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:
                    pass
                conn.close()


class Forked:
    """The caller's side of one forked command: wait for it, its READY line, its output, kill it."""

    def __init__(self, socket_path: Path, module: str, argv: list[str], stdout: Path, stderr: Path | None = None,
                 timeout: float = 10.0):
        self.module, self.stdout, self.stderr = module, Path(stdout), Path(stderr or stdout)
        self.info: dict = {}
        self.rc: int | None = None
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.settimeout(timeout)
        self._conn.connect(str(socket_path))
        self._conn.sendall(json.dumps({"module": module, "argv": argv, "stdout": str(self.stdout),
                                       "stderr": str(self.stderr)}).encode() + b"\n")
        self._buf = b""
        started = self._line(timeout)
        if not started or not isinstance(started.get("pid"), int):
            self._conn.close()
            raise RuntimeError(f"the fork server at {socket_path} did not start {module}")
        self.pid = started["pid"]

    def _line(self, timeout: float) -> dict | None:
        """The next JSON line from the server within `timeout` seconds (None: not yet); {} at its end."""
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._conn], [], [], left)[0]:
                return None
            chunk = self._conn.recv(4096)
            if not chunk:
                return {}
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if it is still running after `timeout` seconds."""
        if self.rc is None:
            msg = self._line(timeout)
            if msg is None:
                return None
            self.rc = int(msg.get("rc", -1))  # {}: the server went away (its children with it)
            self._conn.close()
        return self.rc

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Wait for its ``RINGSERVE_READY {json}`` line (launch/procs.py's announce)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.stdout.exists():
                for line in self.stdout.read_text(errors="replace").splitlines():
                    if line.startswith(READY_PREFIX):
                        self.info = json.loads(line[len(READY_PREFIX):])
                        return self.info
            if self.wait(0.05) is not None:
                break
        self.kill()
        raise RuntimeError(f"{self.module} did not start (rc {self.rc}): {self.tail_log()}")

    def alive(self) -> bool:
        return self.wait(0.01) is None

    def kill(self) -> None:
        if self.wait(0) is None:  # still running (its pid not reaped, so not reused)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait(5)

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") if self.stdout.exists() else ""

    def tail_log(self, n: int = 20) -> str:
        text = "".join(p.read_text(errors="replace") for p in {self.stdout, self.stderr} if p.exists())
        return "\n".join(text.splitlines()[-n:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True, help="the Unix socket to take requests on")
    p.add_argument("--preload", default="", help="modules to import once, comma-separated")
    args = p.parse_args()
    for name in filter(None, args.preload.split(",")):
        importlib.import_module(name)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.socket)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
