"""What a new user meets first: help with defaults, config files, clear errors, the status table."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from ringserve.client.admin import AdminClient, format_status
from ringserve.launch.procs import wait_for_workers

pytestmark = pytest.mark.timeout(120)
EPH = "tcp://127.0.0.1:*"


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("role,shown", [
    ("ringserve.launch.master", ["tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556", "tcp://127.0.0.1:5557",
                                 "(default: least-outstanding)", "(default: 1000)"]),
    ("ringserve.launch.worker", ["tcp://127.0.0.1:5556", "--max-batch-size", "(default: 32)", "(default: 0.0)",
                                 "(default: auto)"]),
    ("ringserve.launch.ps", ["tcp://127.0.0.1:5600", "--keep KEEP", "(default: 3)"]),
    ("ringserve.launch.publish", ["(default: 4194304)", "(default: 30.0)"]),
])
def test_help_shows_defaults(role, shown):
    out = run(role, "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # help wraps lines
    for s in shown:
        assert s in text, (s, out.stdout)


def test_admin_help_mentions_every_command_including_rollback():
    out = run("ringserve.launch.admin", "--help")
    assert out.returncode == 0 and "rollback" in out.stdout and "route" in out.stdout and "drain" in out.stdout


def test_a_port_in_use_is_one_clear_line_naming_the_flag(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        master = run("ringserve.launch.master", "--frontend", EPH, "--backend", taken, "--admin", EPH)
        shard = run("ringserve.launch.ps", "--name", "a", "--data-dir", str(tmp_path), "--bind", taken)
    for out, flag in ((master, "--backend"), (shard, "--bind")):
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().splitlines()[-1] == f"error: cannot bind {taken}: address already in use; " \
                                                      f"choose another with {flag}"


def test_roles_take_settings_from_a_config_file_and_flags_win(cluster, tmp_path):
    (tmp_path / "master.toml").write_text(f'frontend = "{EPH}"\nbackend = "{EPH}"\nadmin = "{EPH}"\n'
                                          'policy = "round-robin"\nheartbeat_interval = 0.2\nmax-queue = 7\n')
    cluster.master = cluster._start("ringserve.launch.master", ["--config", str(tmp_path / "master.toml")], "m")
    assert AdminClient(cluster.admin).status()["policy"] == "round-robin"
    (tmp_path / "worker.toml").write_text(f'master = "{cluster.master.info["backend"]}"\nname = "from-file"\n'
                                          'model = ["echo=ringserve.worker.demo:noop", "mlp=ringserve.worker.demo:mlp"]\n'
                                          'heartbeat-interval = 0.2\nthreads = 1\n')
    cluster._start("ringserve.launch.worker", ["--config", str(tmp_path / "worker.toml"), "--name", "from-flag"], "w")
    st = wait_for_workers(cluster.admin, 1, 60)
    assert st["workers"][0]["name"] == "from-flag" and set(st["workers"][0]["models"]) == {"echo", "mlp"}

    other = cluster._start("ringserve.launch.master", ["--config", str(tmp_path / "master.toml"), "--policy",
                                                       "random"], "m2")
    assert AdminClient(other.info["admin"]).status()["policy"] == "random"


@pytest.mark.parametrize("text,err", [("frontnd = 1\n", "unknown key 'frontnd'"), ("max-queue = 0\n", "max-queue"),
                                      ("policy = [1]\n", "one value"), ("not toml ==\n", "not valid TOML")])
def test_bad_config_files_are_refused_with_a_reason(tmp_path, text, err):
    (tmp_path / "bad.toml").write_text(text)
    out = run("ringserve.launch.master", "--config", str(tmp_path / "bad.toml"))
    assert out.returncode == 2 and err in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_status_table_stays_aligned_with_long_model_lists():
    models = {f"model-with-a-long-name-{i}": {"version": i, "ready": True} for i in range(6)}
    st = {"epoch": "e", "policy": "p", "uptime_s": 1, "pending": 0, "models": {
        name: {"queue_depth": 0, "in_flight": 0, "requests": 1, "ok": 1, "retries": 0, "versions": [1]}
        for name in models},
        "workers": [{"name": f"w{i}", "state": "ready", "device": "cpu", "models": models, "credit": 4,
                     "in_flight": 0, "done": 3, "heartbeat_age_s": 0.1, "stats": {}} for i in range(2)]}
    lines = format_status(st).splitlines()
    header = next(line for line in lines if line.startswith("WORKER"))
    rows = [line for line in lines if line.startswith("w0") or line.startswith("w1")]
    assert len(rows) == 2 and rows[0].index("ready") == header.index("STATE")
    for col in ("CREDIT", "DONE", "MODELS"):  # every column starts where its header does, models last
        end = header.index(col) + len(col)
        assert all(r[header.index(col):end].strip() for r in rows), (col, header, rows)
    assert rows[0].index("model-with-a-long-name-0") == header.index("MODELS")
    model_header = next(line for line in lines if line.startswith("MODEL "))
    model_rows = [line for line in lines if line.startswith("model-with")]
    assert len(model_rows) == 6 and all(len(r) == len(model_rows[0]) for r in model_rows)
    assert all(r.index(" 1 ") < model_header.index("VERSIONS") for r in model_rows)


def test_publish_diff_writes_or_publishes_only_changed_tensors_and_lists_versions(cluster, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from ringserve.client.params import ParamClient
    from ringserve.worker import demo

    old = {k: v.contiguous() for k, v in demo.mlp(seed=1).state_dict().items()}
    new = dict(old, **{"net.4.bias": old["net.4.bias"] + 1.0})
    save_file(old, str(tmp_path / "old.safetensors"))
    save_file(new, str(tmp_path / "new.safetensors"))
    out = run("ringserve.launch.publish", "--diff", str(tmp_path / "old.safetensors"), str(tmp_path / "new.safetensors"),
              "--out", str(tmp_path / "delta.safetensors"))
    assert out.returncode == 0, out.stderr
    assert set(load_file(str(tmp_path / "delta.safetensors"))) == {"net.4.bias"}
    assert '"changed": ["net.4.bias"]' in out.stdout

    eps = cluster.start_shards(2)
    shards = ",".join(f"{n}={e}" for n, e in eps.items())
    with ParamClient(eps) as pc:
        assert pc.publish("mlp", old) == 1
    out = run("ringserve.launch.publish", "--shards", shards, "--model", "mlp", "--diff",
              str(tmp_path / "old.safetensors"), str(tmp_path / "new.safetensors"), "--base", "1")
    assert out.returncode == 0 and '"version": 2' in out.stdout, out.stderr
    listing = run("ringserve.launch.publish", "--shards", shards, "--model", "mlp")
    lines = listing.stdout.splitlines()
    assert listing.returncode == 0 and lines[1].split() == ["SHARD", "VERSIONS", "CURRENT", "NOTES"]
    assert all(line.split()[1:3] == ["1,2", "2"] for line in lines[2:]) and len(lines) == 4

    save_file({k: v for k, v in new.items() if k != "net.0.weight"}, str(tmp_path / "fewer.safetensors"))
    out = run("ringserve.launch.publish", "--diff", str(tmp_path / "old.safetensors"),
              str(tmp_path / "fewer.safetensors"), "--out", str(tmp_path / "x.safetensors"))
    assert out.returncode == 1 and "lacks 1 tensor" in out.stderr and "Traceback" not in out.stderr
    assert torch.equal(load_file(str(tmp_path / "new.safetensors"))["net.4.bias"], new["net.4.bias"])


def test_the_config_files_in_docs_deployment_parse_for_their_roles():
    import importlib
    import re
    import tomllib
    from pathlib import Path

    from ringserve.launch.cli import config_flags

    text = (Path(__file__).resolve().parent.parent / "docs" / "deployment.md").read_text()
    blocks = re.findall(r"`[\w.]+:(?:/[\w.~-]+)*/([\w.-]+)\.toml`[^\n]*\n(?:[^\n]*\n)*?\n```toml\n(.*?)```", text, re.S)
    roles = {"master": ["master"], "ps0": ["ps"], "worker": ["worker"]}
    parsed = []
    for name, body in blocks:
        config = tomllib.loads(body)
        for role in roles.get(name, []):
            parser = importlib.import_module(f"ringserve.launch.{role}").parser()
            args = parser.parse_args(config_flags(parser, config, []))
            parsed.append((role, args))
    ops = re.search(r"~/ringserve\.toml`:\n\n```toml\n(.*?)```", text, re.S).group(1)
    for role, argv in (("publish", ["--model", "mlp"]), ("admin", ["status"]), ("admin", ["rollback", "--model", "m",
                                                                                         "--version", "1"])):
        parser = importlib.import_module(f"ringserve.launch.{role}").parser()
        parsed.append((role, parser.parse_args(argv + config_flags(parser, tomllib.loads(ops), argv))))
    assert sorted({r for r, _ in parsed}) == ["admin", "master", "ps", "publish", "worker"]
    master = next(a for r, a in parsed if r == "master")
    assert master.backend == "tcp://0.0.0.0:5556" and master.max_queue == 2000
    worker = next(a for r, a in parsed if r == "worker")
    assert len(worker.model) == 2 and worker.paramservers.startswith("ps0=")


@pytest.mark.parametrize("flag", [["--weight", "nan"], ["--weight", "0"], ["--max-batch-size", "0"],
                                  ["--heartbeat-interval", "-1"], ["--max-models", "2"]])
def test_worker_flags_are_checked_at_parse_time(flag):
    out = run("ringserve.launch.worker", "--model", "m=ringserve.worker.demo:mlp", *flag)
    assert out.returncode == 2 and "error:" in out.stderr and "Traceback" not in out.stderr, out.stderr
