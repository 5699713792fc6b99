"""Every console script, every subcommand, through its real command line (the installed script in
a subprocess), against one real small cluster for the module; and their parsers' help."""
from __future__ import annotations

import argparse
import configparser
import importlib
import json
import os
import queue
import re
import select
import signal
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from safetensors.torch import save_file

from conftest import Cluster
from helpers import mlp_state, shard_list
from ringserve.launch import cli
from ringserve.launch.procs import wait_for_workers, wait_until

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parent.parent


def _declared_scripts() -> dict[str, str]:
    """console_scripts of setup.cfg: name -> module."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return {name.strip(): target.strip().split(":")[0] for name, target in (line.split("=", 1) for line in lines)}


SCRIPTS = _declared_scripts()


def _subcommands(module: str) -> list[str]:
    p = importlib.import_module(module).parser()
    return [name for a in p._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]


COMMANDS = [(name, sub) for name, module in SCRIPTS.items() for sub in [None, *_subcommands(module)]]


def script(name: str) -> str:
    """The installed console script of this interpreter's environment."""
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (folder / name).exists():
            return str(folder / name)
    pytest.fail(f"console script {name} is not installed next to {sys.executable} (pip install -e .)")


def run(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([script(name), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_error_line(out: subprocess.CompletedProcess) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), (out.returncode, out.stderr)
    return lines[0]


# ------------------------------------------------------------------ parsers and --help
def test_the_installed_console_scripts_are_the_declared_ones():
    installed = {e.name: e.value.split(":")[0] for e in entry_points(group="console_scripts")
                 if e.value.startswith("ringserve.")}
    assert installed == SCRIPTS


@pytest.mark.parametrize("module", sorted(set(SCRIPTS.values())))
def test_every_option_has_help_and_shows_its_default_once(module):
    parser = importlib.import_module(module).parser()
    for owner, action in cli.all_actions(parser):
        if isinstance(action, argparse._HelpAction):
            continue
        what = f"{owner.prog} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help.strip() and action.help != cli._NO_HELP, f"{what} has no help text"
        assert issubclass(owner.formatter_class, cli.HelpFormatter), f"{owner.prog} does not show defaults"
        text = owner._get_formatter()._expand_help(action)
        shown = len(re.findall(r"\(default\b", text))
        assert shown <= 1, f"{what} shows its default {shown} times: {text!r}"
        if cli._default_worth_showing(action):
            assert shown == 1, f"{what} does not show its default {action.default!r}: {text!r}"


@pytest.mark.parametrize("name,sub", COMMANDS, ids=[f"{n}-{s}" if s else n for n, s in COMMANDS])
def test_help_of_every_command_and_subcommand(name, sub):
    out = run(name, *([sub] if sub else []), "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr
    for line in out.stdout.splitlines():  # one option per line: none runs into the next
        assert not re.match(r"^\s+-{1,2}\w\S*.*?\s{2,}-{1,2}\w[\w-]* [A-Z]", line), line
    for opt in re.findall(r"^\s+(--[\w-]+)", out.stdout, re.M):
        assert opt in out.stdout


# ------------------------------------------------------------------ one live cluster for the module
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    c = Cluster(tmp)
    try:
        shards = shard_list(c.start_shards(1))
        c.start_master()
        v1, v2 = mlp_state(1), mlp_state(1)
        v2["net.4.bias"] = v2["net.4.bias"] + 1.0
        save_file(v1, str(tmp / "v1.safetensors"))
        save_file(v2, str(tmp / "v2.safetensors"))
        out = run("ringserve-publish", "--shards", shards, "--model", "mlp", "--weights", str(tmp / "v1.safetensors"))
        assert out.returncode == 0 and json.loads(out.stdout)["version"] == 1, out.stderr
        c.start_workers(1, "--paramservers", shards, "--keep-versions", "2", names=["w0"], wait=False)
        wait_for_workers(c.admin, 1, 60, model="mlp", version=1)
        out = run("ringserve-publish", "--shards", shards, "--model", "mlp", "--diff", str(tmp / "v1.safetensors"),
                  str(tmp / "v2.safetensors"), "--base", "1")
        assert out.returncode == 0 and json.loads(out.stdout)["changed"] == ["net.4.bias"], out.stderr
        wait_for_workers(c.admin, 1, 60, model="mlp", version=2)  # v1 stays loaded beside it (a split's target)
        c.shard_list = shards
        yield c
    finally:
        c.stop_all()


def test_publish_lists_versions(live):
    out = run("ringserve-publish", "--shards", live.shard_list, "--model", "mlp", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ps0"]["current"] == 2
    table = run("ringserve-publish", "--shards", live.shard_list, "--model", "mlp")
    assert table.returncode == 0 and table.stdout.splitlines()[2].split()[:3] == ["ps0", "1,2", "2"]


def test_admin_status_table_and_json(live):
    out = run("ringserve-admin", "status", "--master", live.admin, "--json")
    assert out.returncode == 0, out.stderr
    assert [w["name"] for w in json.loads(out.stdout)["workers"]] == ["w0"]
    table = run("ringserve-admin", "status", "--master", live.admin)
    assert table.returncode == 0 and "WORKER" in table.stdout and "w0" in table.stdout


def test_admin_route_sets_promotes_and_clears_a_split(live):
    steps = [(["--split", "1=90,2=10"], {"mlp": [[1, 90], [2, 10]]}),
             (["--split", "1=50,2=50", "--sticky-key", "user"], {"mlp": [[1, 50], [2, 50]]}),
             (["--promote", "2"], {"mlp": [[2, 100]]}),
             (["--clear"], {})]
    for flags, split in steps:
        out = run("ringserve-admin", "route", "--master", live.admin, "--model", "mlp", *flags)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        routes = json.loads(out.stdout)["routes"]
        assert {m: r["split"] for m, r in routes.items()} == split
    bad = run("ringserve-admin", "route", "--master", live.admin, "--model", "mlp", "--split", "1=60,2=10")
    assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False and "Traceback" not in bad.stderr


def test_admin_drain_sends_a_worker_away(live):
    spare = live.start_workers(1, names=["spare"], wait=False)[0]
    wait_until(lambda: "spare" in run("ringserve-admin", "status", "--master", live.admin).stdout, 60, 0.5, "spare")
    out = run("ringserve-admin", "drain", "spare", "--master", live.admin)
    assert out.returncode == 0 and json.loads(out.stdout) == {"ok": True, "draining": ["spare"]}, out.stderr
    assert spare.wait(30) is not None  # it finished and left
    names = [w["name"] for w in json.loads(run("ringserve-admin", "status", "--master", live.admin, "--json")
                                               .stdout)["workers"]]
    assert "spare" not in names and "w0" in names
    missing = run("ringserve-admin", "drain", "nobody", "--master", live.admin)
    assert missing.returncode == 1 and "no worker named" in missing.stdout


def test_admin_rollback_and_back(live):
    out = run("ringserve-admin", "rollback", "--shards", live.shard_list, "--model", "mlp", "--version", "1")
    assert out.returncode == 0 and json.loads(out.stdout) == {"model": "mlp", "current": 1}, out.stderr
    listing = json.loads(run("ringserve-publish", "--shards", live.shard_list, "--model", "mlp", "--json").stdout)
    assert listing["ps0"]["current"] == 1
    again = run("ringserve-publish", "--shards", live.shard_list, "--model", "mlp", "--rollback", "2")
    assert again.returncode == 0, again.stderr
    missing = run("ringserve-admin", "rollback", "--shards", live.shard_list, "--model", "mlp", "--version", "99")
    assert "v99" in one_error_line(missing)


def test_admin_route_and_status_with_keys_against_a_curve_master(tmp_path):
    """route takes the security flags like status (it crashed with AttributeError before)."""
    keys = tmp_path / "keys"
    for role, name in (("master", "master"), ("admin", "ops")):
        assert run("ringserve-keys", str(keys), "new", role, name).returncode == 0
    c = Cluster(tmp_path)
    try:
        c.start_master("--keys", str(keys))
        out = run("ringserve-admin", "route", "--master", c.admin, "--keys", str(keys), "--model", "mlp", "--clear")
        # the master answered over CURVE (there is no route to clear: a refusal, exit 1, one JSON line)
        assert out.returncode == 1 and "no route for 'mlp'" in json.loads(out.stdout)["error"]["message"], out.stderr
        out = run("ringserve-admin", "status", "--master", c.admin, "--keys", str(keys), "--key-name", "ops", "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["workers"] == [], out.stderr
        plain = run("ringserve-admin", "route", "--master", c.admin, "--model", "mlp", "--clear", timeout=30)
        assert "no answer" in one_error_line(plain)  # a plaintext admin gets nothing from a CURVE master
    finally:
        c.stop_all()


def test_admin_with_no_master_is_one_line():
    assert "no answer" in one_error_line(run("ringserve-admin", "route", "--master", "tcp://127.0.0.1:9",
                                             "--model", "m", "--clear", timeout=30))


# ------------------------------------------------------------------ ringserve-keys
def test_keys_new_list_revoke_and_config(tmp_path):
    keys = tmp_path / "keys"
    out = run("ringserve-keys", str(keys), "new", "worker", "gpu-a", "gpu-b")
    assert out.returncode == 0 and [json.loads(line)["name"] for line in out.stdout.splitlines()] == ["gpu-a", "gpu-b"]
    assert (keys / "secret" / "worker" / "gpu-a.key_secret").stat().st_mode & 0o077 == 0
    assert json.loads(run("ringserve-keys", str(keys), "list").stdout)["worker"] == ["gpu-a", "gpu-b"]
    out = run("ringserve-keys", str(keys), "revoke", "worker", "gpu-b")
    assert out.returncode == 0 and json.loads(out.stdout) == {"revoked": "worker:gpu-b"}
    assert "no key worker:gpu-b" in one_error_line(run("ringserve-keys", str(keys), "revoke", "worker", "gpu-b"))
    assert "already exists" in one_error_line(run("ringserve-keys", str(keys), "new", "worker", "gpu-a"))
    # The operator's shared file of docs/deployment.md: `keys = DIR` at the top, other roles' tables
    (tmp_path / "ops.toml").write_text(f'keys = "{keys}"\n[admin]\nmaster = "tcp://127.0.0.1:5557"\n')
    out = run("ringserve-keys", "--config", str(tmp_path / "ops.toml"), "list")
    assert out.returncode == 0 and json.loads(out.stdout)["worker"] == ["gpu-a"], out.stderr
    out = run("ringserve-keys", "--config", str(tmp_path / "ops.toml"), "new", "admin", "ops")
    assert out.returncode == 0 and (keys / "public" / "admin" / "ops.key").exists(), out.stderr
    assert json.loads(run("ringserve-keys", "--keys", str(keys), "list").stdout)["admin"] == ["ops"]


@pytest.mark.parametrize("command", [["list"], ["revoke", "worker", "a"]])
def test_keys_on_a_missing_directory_fail_in_one_line(tmp_path, command):
    line = one_error_line(run("ringserve-keys", str(tmp_path / "nonexistent"), *command))
    assert line == f"error: no keys directory {tmp_path / 'nonexistent'}"


def test_security_is_importable_from_the_package():
    from ringserve import Security, SecurityError
    from ringserve.protocol import security

    assert Security is security.Security and SecurityError is security.SecurityError


# ------------------------------------------------------------------ children never outlive their parent
def _gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for its (new) parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _reap(pids) -> None:
    for pid in pids:  # a failed test must not leave them behind either
        for kill in (os.killpg, os.kill):  # its group where it leads one, else the process
            if not _gone(pid):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


PARENT = textwrap.dedent("""
    import sys, threading, time
    from ringserve.launch.procs import RoleProcess
    where, data = sys.argv[1], sys.argv[2]
    def start():
        p = RoleProcess("ringserve.launch.ps", ["--name", "a", "--data-dir", data, "--bind", "tcp://127.0.0.1:*",
                                                "--pub", "tcp://127.0.0.1:*"], data + "/ps.log")
        print(p.pid, flush=True)
    if where == "main":
        start()
    else:  # the starting thread ends at once: the child must live on while this process does
        t = threading.Thread(target=start)
        t.start()
        t.join()
    time.sleep(120)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_role_dies_with_its_sigkilled_parent(tmp_path, where):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, where, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 60)
        assert ready, "the parent did not start its role"
        child = int(parent.stdout.readline())
        time.sleep(0.5)
        assert not _gone(child), "the role died while its parent lives"
        parent.kill()
        parent.wait(10)
        wait_until(lambda: _gone(child), 30, 0.1, f"role {child} to leave after its parent was SIGKILLed")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child:
            _reap([child])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_serve_keeps_serving_and_leaves_no_orphans_when_sigkilled(tmp_path):
    local = subprocess.Popen([script("ringserve-local"), "--workers", "1", "--shards", "1", "--requests", "1",
                              "--serve", "--workdir", str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    children: list[int] = []
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in local.stdout], daemon=True).start()
    try:
        seen, end = [], time.monotonic() + 150
        while not seen or "ringserve-admin rollback" not in seen[-1]:  # the last of the commands to try
            try:
                seen.append(lines.get(timeout=max(0.01, end - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"ringserve-local did not start serving: {''.join(seen)}")
        text = "".join(seen)
        assert "serving until Ctrl-C" in text
        admin = re.search(r"ringserve-admin status --master (\S+)", text).group(1)
        children = _children(local.pid)
        assert len(children) == 4, children  # ps0, master, worker-0, gateway
        time.sleep(1.5)  # still serving after the demo
        st = run("ringserve-admin", "status", "--master", admin, "--json")
        assert st.returncode == 0 and [w["name"] for w in json.loads(st.stdout)["workers"]] == ["worker-0"]
        local.kill()
        local.wait(10)
        wait_until(lambda: all(_gone(c) for c in children), 30, 0.1, "ringserve-local's roles to leave")
    finally:
        if local.poll() is None:
            local.kill()
            local.wait(10)
        _reap(children)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_all_gpus_workers_die_with_their_sigkilled_launcher():
    launcher = subprocess.Popen([script("ringserve-worker"), "--device", "all-gpus", "--master", "tcp://127.0.0.1:9",
                                 "--model", "mlp=ringserve.worker.demo:mlp", "--threads", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    children: list[int] = []
    try:
        children = wait_until(lambda: _children(launcher.pid), 60, 0.1, "the per-device worker")
        launcher.kill()
        launcher.wait(10)
        wait_until(lambda: all(_gone(c) for c in children), 30, 0.1, "the per-device workers to leave")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        _reap(children)
