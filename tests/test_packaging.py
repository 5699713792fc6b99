"""The project installs under the one import name `ringserve` and nothing else of ours."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BARE = ["client", "master", "worker", "protocol", "launch", "paramserver"]

CHECK = f"""
import importlib.util, sys
import ringserve, ringserve.master.broker, ringserve.worker.loader, ringserve.paramserver.shard
from ringserve import Client, AdminClient, Overloaded
assert ringserve.__file__.startswith(sys.prefix), ringserve.__file__
bare = [n for n in {BARE!r} if importlib.util.find_spec(n) is not None]
assert not bare, f"importable as bare names: {{bare}}"
print("ok")
"""


@pytest.mark.timeout(240)
def test_fresh_venv_installs_only_ringserve(tmp_path):
    # A copy of the source, so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", ".venv"))
    venv = tmp_path / "venv"
    # The venv sees the outer site-packages only for the heavy dependencies (torch, zmq);
    # ringserve itself is installed into it, non-editable, from the copy.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # Build the wheel with this interpreter's setuptools (the venv's bundled one may be too old).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=180, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("ringserve-*.whl"))
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=180, cwd=tmp_path)
    out = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
    help_out = subprocess.run([str(venv / "bin" / "ringserve-master"), "--help"], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
    assert help_out.returncode == 0 and "usage" in help_out.stdout
