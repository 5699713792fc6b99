"""The project installs under the one import name `ringserve` and nothing else of ours."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BARE = ["client", "master", "worker", "protocol", "launch", "paramserver", "gateway"]

CHECK = f"""
import importlib.util, sys
import ringserve, ringserve.master.broker, ringserve.worker.loader, ringserve.paramserver.shard
from ringserve import Client, AdminClient, Overloaded
assert ringserve.__file__.startswith(sys.prefix), ringserve.__file__
bare = [n for n in {BARE!r} if importlib.util.find_spec(n) is not None]
assert not bare, f"importable as bare names: {{bare}}"
print("ok")
"""


def outer_site_packages() -> list[str]:
    """Where this interpreter's dependencies live (a virtualenv's and, with --system-site-packages,
    its base's): never the checkout, so only the installed wheel can provide `ringserve`."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


@pytest.mark.timeout(240)
def test_fresh_venv_installs_only_ringserve(tmp_path):
    # A copy of the source, so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", ".venv*"))
    venv = tmp_path / "venv"
    # Made from the base interpreter (a venv made from a venv's python would see the base's
    # site-packages, not the outer venv's). The outer site-packages are added as plain path
    # entries of a .pth file, for the heavy dependencies (torch, zmq): their own .pth files (an
    # editable ringserve's finder among them) are not run, so ringserve comes only from the wheel.
    base = getattr(sys, "_base_executable", None) or sys.executable
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # the wheel, only
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120, env=clean)
    py = venv / "bin" / "python"
    nested_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 capture_output=True, text=True, check=True, timeout=60, env=clean).stdout.strip()
    Path(nested_site, "outer-env.pth").write_text("\n".join(outer_site_packages()) + "\n")
    # Build the wheel with this interpreter's setuptools (the venv's bundled one may be too old).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=180, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("ringserve-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/", 1)[0] for name in zf.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"ringserve"}, tops
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=180, cwd=tmp_path, env=clean)
    out = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=clean)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
    help_out = subprocess.run([str(venv / "bin" / "ringserve-master"), "--help"], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path, env=clean)
    assert help_out.returncode == 0 and "usage" in help_out.stdout
