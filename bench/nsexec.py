"""python -m bench.nsexec NS MODULE ARGS...: become `python -m MODULE ARGS` inside network namespace NS.

It execs `ip netns exec` (so the pid, the session and stdout stay those launch/procs.py's
RoleProcess started, and stop() still reaches the whole group); Python 3.11 has no os.setns.
"""
from __future__ import annotations

import os
import sys


def main() -> None:
    if len(sys.argv) < 3:
        print("usage: python -m bench.nsexec NS MODULE [ARGS...]", file=sys.stderr)
        sys.exit(2)
    ns, module, *args = sys.argv[1:]
    os.execvp("ip", ["ip", "netns", "exec", ns, sys.executable, "-m", module, *args])


if __name__ == "__main__":
    main()
