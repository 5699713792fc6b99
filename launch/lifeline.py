"""Role processes must not outlive whoever started them (a SIGKILLed ringserve-local, test or bench).

`launch/procs.py` starts each role as ``python -m ringserve.launch.lifeline FD MODULE ARGS...``:
this module ties the process to its parent, then runs MODULE as ``__main__`` in the same
process (same pid, same argv as ``python -m MODULE ARGS...``). Two ties:

- a pipe: the parent holds its write end, the child reads FD; end of file means the parent
  process is gone (every thread of it), on any POSIX system. The child then SIGTERMs itself
  (the role's graceful stop) and, if it is still there after `GRACE_S`, exits hard.
- on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` as well (immediate, even while the child's
  Python is busy in C code), but only when the parent asked for it (``RINGSERVE_PDEATHSIG=1``):
  the kernel sends it when the parent *thread* exits, so procs.py asks only from its main thread.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import runpy
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
GRACE_S = 20.0  # longer than a master's default --drain-timeout (10 s)
PDEATHSIG_ENV = "RINGSERVE_PDEATHSIG"
PARENT_ENV = "RINGSERVE_PARENT_PID"


def set_pdeathsig(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` when the parent thread exits; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _leave() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)  # the role did not stop on SIGTERM: never linger as an orphan


def _watch(fd: int) -> None:
    """Block on the lifeline pipe; its end of file means the parent is gone."""
    try:
        while os.read(fd, 1):
            pass  # nothing is ever written; keep waiting for the end
    except OSError:
        pass
    _leave()


def tie_to_parent(fd: int) -> None:
    parent = os.environ.pop(PARENT_ENV, None)
    if os.environ.pop(PDEATHSIG_ENV, "") == "1":
        set_pdeathsig()
    if parent is not None and str(os.getppid()) != parent:  # the parent died before prctl took effect
        _leave()
    threading.Thread(target=_watch, args=(fd,), name="lifeline", daemon=True).start()


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m ringserve.launch.lifeline FD MODULE [ARGS...]")
    fd, module = int(sys.argv[1]), sys.argv[2]
    tie_to_parent(fd)
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
