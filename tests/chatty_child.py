"""A role-like child for test_worker_robustness: announces itself, then writes 1 MiB to stdout."""
import sys
from pathlib import Path

from ringserve.launch.procs import announce

if __name__ == "__main__":
    announce({"role": "chatty"})
    for _ in range(1024):
        sys.stdout.write("x" * 1023 + "\n")
    sys.stdout.flush()
    Path(sys.argv[1]).write_text("done")
