"""deploy/ (Kubernetes) checked offline: every overlay renders with `kubectl kustomize`, every
rendered object passes the Kubernetes schemas (kubernetes-validate --strict), and the names that
must agree do (shard StatefulSet and headless Service, the ring in the workers' and tools'
configs, ports, probes, drain timeouts, the metric the HPA reads). The worker readiness probe is
run for real against a worker. Skips with the reason when kubectl or the schemas are missing."""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "secure")
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: `kubectl kustomize` "
                                                           "renders the overlays")
pytestmark = pytest.mark.timeout(120)

_rendered: dict[str, list[dict]] = {}


def render(overlay: str) -> list[dict]:
    if overlay not in _rendered:
        out = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        _rendered[overlay] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _rendered[overlay]


def obj(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def configs(docs: list[dict]) -> dict[str, dict]:
    """The TOML files of the ringserve-config ConfigMap, parsed."""
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("ringserve-config"))
    return {k: tomllib.loads(v) for k, v in cm["data"].items()}


def ring(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(","))


def container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    kinds = sorted({d["kind"] for d in render(overlay)})
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "HorizontalPodAutoscaler"} <= set(kinds), kinds


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_pass_the_kubernetes_schemas(overlay):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the test extra) is not installed")
    version = kv.latest_version() if hasattr(kv, "latest_version") else "1.30.0"
    for d in render(overlay):
        try:
            kv.validate(d, version, strict=True)
        except kv.SchemaNotFoundError as exc:
            pytest.skip(f"no offline Kubernetes schema for {d['kind']} {version}: {exc}")
        except kv.ValidationError as exc:
            pytest.fail(f"{overlay}: {d['kind']}/{d['metadata']['name']}: {exc.message} at {list(exc.path)}")
    # the validator is not vacuous: a misspelt field is refused
    bad = json.loads(json.dumps(obj(render(overlay), "Deployment", "ringserve-worker")))
    container(bad)["readinesProbe"] = container(bad).pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shard_names_ring_and_configs_agree(overlay):
    docs = render(overlay)
    sts = obj(docs, "StatefulSet", "ps")
    svc = obj(docs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None", "the shards' Service must be headless (a stable name per pod)"
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    port = next(p["containerPort"] for p in container(sts)["ports"] if p["name"] == "commands")
    pods = [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]
    expected = {p: f"tcp://{p}.{svc['metadata']['name']}:{port}" for p in pods}
    cfg = configs(docs)
    assert ring(cfg["worker.toml"]["paramservers"]) == expected
    assert ring(cfg["tools.toml"]["publish"]["shards"]) == expected
    assert ring(cfg["tools.toml"]["admin"]["shards"]) == expected
    args = container(sts)["args"]
    assert args[args.index("--name") + 1] == "$(POD_NAME)", "a shard's ring name must be its pod name"
    assert cfg["ps.toml"]["bind"].endswith(f":{port}")
    pub = args[args.index("--pub") + 1]
    assert "0.0.0.0" not in pub and "$(POD_IP)" in pub  # workers connect to the address the shard tells them
    # the workers, their probe and the tools know every master, by its stable name, on its ports
    masters = obj(docs, "StatefulSet", "ringserve-master")
    master_svc = obj(docs, "Service", masters["spec"]["serviceName"])
    assert master_svc["spec"]["clusterIP"] == "None"
    ports = {p["name"]: p["port"] for p in master_svc["spec"]["ports"]}
    n = masters["spec"]["replicas"]
    assert int(env_of(container(masters))["MASTER_REPLICAS"]) == n >= 2
    names = [f"ringserve-master-{i}.{master_svc['metadata']['name']}" for i in range(n)]
    assert cfg["worker.toml"]["master"] == ",".join(f"tcp://{h}:{ports['backend']}" for h in names)
    assert cfg["tools.toml"]["admin"]["master"] == ",".join(f"tcp://{h}:{ports['admin']}" for h in names)
    probe_env = env_of(container(obj(docs, "Deployment", "ringserve-worker")))
    assert probe_env["RINGSERVE_ADMIN"] == ",".join(f"tcp://{h}:{ports['admin']}" for h in names)
    assert cfg["master.toml"]["backend"].endswith(f":{ports['backend']}")
    assert cfg["master.toml"]["admin"].endswith(f":{ports['admin']}")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_drain_and_grace_periods(overlay):
    docs = render(overlay)
    cfg = configs(docs)
    worker = obj(docs, "Deployment", "ringserve-worker")
    c = container(worker)
    assert c["readinessProbe"]["exec"]["command"][-1] == "/etc/ringserve/probe/ready.py"
    assert c["lifecycle"]["preStop"]["exec"]["command"][-1] == "/etc/ringserve/probe/drain.sh"
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > int(env_of(c)["DRAIN_TIMEOUT"])
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    master = obj(docs, "StatefulSet", "ringserve-master")
    mc = container(master)
    grace = master["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(env_of(mc)["DRAIN_TIMEOUT"]) > cfg["master.toml"]["drain-timeout"]
    assert mc["lifecycle"]["preStop"]["exec"]["command"][-1] == "/etc/ringserve/probe/drain.sh"
    assert [t["metadata"]["name"] for t in master["spec"]["volumeClaimTemplates"]] == ["state"]
    sts = obj(docs, "StatefulSet", "ps")
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
    assert any(m["name"] == "data" and m["mountPath"] == cfg["ps.toml"]["data-dir"] for m in container(sts)["volumeMounts"])


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scrape_annotations_match_metrics_ports(overlay):
    docs = render(overlay)
    cfg = configs(docs)
    for kind, name, file in (("StatefulSet", "ringserve-master", "master.toml"), ("StatefulSet", "ps", "ps.toml"),
                             ("Deployment", "ringserve-worker", "worker.toml")):
        w = obj(docs, kind, name)
        ann = w["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert int(ann["prometheus.io/port"]) == cfg[file]["metrics-port"]
        assert cfg[file]["metrics-port"] in {p["containerPort"] for p in container(w)["ports"]}
        assert ann.get("prometheus.io/scheme", "http") == ("https" if "metrics-tls-cert" in cfg[file] else "http")


@needs_kubectl
def test_gpu_overlay_asks_for_a_gpu_per_worker():
    c = container(obj(render("gpu"), "Deployment", "ringserve-worker"))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith("-cuda") and "--device=cuda" in c["args"]
    assert container(obj(render("gpu"), "StatefulSet", "ringserve-master"))["image"].endswith("-cpu")


@needs_kubectl
def test_secure_overlay_keys_come_from_secrets():
    docs = render("secure")
    cfg = configs(docs)
    for file in ("master.toml", "ps.toml", "worker.toml", "tools.toml"):
        assert cfg[file]["keys"] == "/etc/ringserve/keys" and not cfg[file].get("insecure"), file
    for file in ("master.toml", "ps.toml", "worker.toml"):
        assert {"metrics-tls-cert", "metrics-tls-key", "metrics-token-file"} <= cfg[file].keys(), file
    for kind, name, own in (("StatefulSet", "ringserve-master", "master"), ("StatefulSet", "ps", "shard"),
                            ("Deployment", "ringserve-worker", "worker")):
        spec = obj(docs, kind, name)["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert secrets[mounts[f"/etc/ringserve/keys/secret/{own}"]]["defaultMode"] == 0o400
        assert f"/etc/ringserve/keys/public/{'master' if own != 'shard' else 'worker'}" in mounts
    assert not [d for d in docs if d["kind"] == "Secret"], "keys never live in the repository"


@needs_kubectl
def test_grafana_dashboard_configmap_is_the_docs_dashboard():
    cm = next(d for d in render("cpu") if d["kind"] == "ConfigMap"
              and d["metadata"]["name"].startswith("ringserve-grafana-dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["grafana-dashboard.json"]) == json.loads((ROOT / "docs/grafana-dashboard.json").read_text())


@needs_kubectl
def test_hpa_follows_the_masters_desired_workers():
    docs = render("cpu")
    hpa = obj(docs, "HorizontalPodAutoscaler", "ringserve-worker")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ringserve-worker"}
    metric = hpa["spec"]["metrics"][0]["external"]
    assert metric["target"] == {"type": "AverageValue", "averageValue": "1"}
    from ringserve.master.metrics import MasterMetrics
    names = {m.name for m in MasterMetrics("least-outstanding").registry.collect()}
    assert metric["metric"]["name"] in names
    served = {spec.split("=", 1)[0] for spec in configs(docs)["worker.toml"]["model"]}
    assert metric["metric"]["selector"]["matchLabels"]["model"] in served


def test_every_config_file_is_accepted_by_its_role():
    """Each TOML in deploy/ goes through the role's own parser (unknown keys and bad values refused)."""
    from ringserve.launch import admin, master, ps, publish, worker
    from ringserve.launch.cli import parse_args

    for cfg_dir in (DEPLOY / "base" / "config", DEPLOY / "overlays" / "secure" / "config"):
        parse_args(master.parser(), ["--config", str(cfg_dir / "master.toml")])
        parse_args(ps.parser(), ["--config", str(cfg_dir / "ps.toml"), "--name", "ps-0"])
        parse_args(worker.parser(), ["--config", str(cfg_dir / "worker.toml"), "--name", "w"])
        parse_args(publish.parser(), ["--config", str(cfg_dir / "tools.toml"), "--list", "--model", "mlp"])
        parse_args(admin.parser(), ["--config", str(cfg_dir / "tools.toml"), "status"])


def test_commands_are_console_scripts_and_images_pin_torch():
    scripts = configparser.ConfigParser()
    scripts.read(ROOT / "setup.cfg")
    console = {line.split("=")[0].strip() for line in scripts["options.entry_points"]["console_scripts"].splitlines()
               if line.strip()}
    text = "".join(p.read_text() for p in DEPLOY.rglob("*.yaml"))
    used = set(re.findall(r'command: \["(ringserve-[a-z]+)"', text)) | set(re.findall(r"exec (ringserve-[a-z]+)", text))
    assert used == {"ringserve-master", "ringserve-ps", "ringserve-worker"} and used <= console
    cpu, cuda = (ROOT / "Dockerfile").read_text(), (ROOT / "Dockerfile.cuda").read_text()
    assert "FROM python:3.11-slim" in cpu and "whl/cpu torch==2.13.0" in cpu
    assert "torch==2.13.0" in cuda and "whl/${CUDA_WHEELS}" in cuda
    for text in (cpu, cuda):
        assert "useradd --uid 10001" in text  # the manifests' runAsUser


@needs_kubectl
def test_each_master_names_the_others_as_peers(tmp_path):
    """The masters' start-up line (sh -c) run with a stand-in ringserve-master that prints its argv."""
    masters = obj(render("cpu"), "StatefulSet", "ringserve-master")
    c = container(masters)
    fake = tmp_path / "ringserve-master"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    seen = {}
    for i in range(masters["spec"]["replicas"]):
        out = subprocess.run([*c["command"], *c["args"]], capture_output=True, text=True, timeout=10,
                             env={"PATH": f"{tmp_path}:/usr/bin:/bin", "POD_NAME": f"ringserve-master-{i}",
                                  "MASTER_REPLICAS": env_of(c)["MASTER_REPLICAS"]})
        assert out.returncode == 0, out.stderr
        seen[i] = out.stdout.split()
    assert seen == {0: ["--config", "/etc/ringserve/master.toml", "--peers", "tcp://ringserve-master-1.ringserve-master:5557"],
                    1: ["--config", "/etc/ringserve/master.toml", "--peers", "tcp://ringserve-master-0.ringserve-master:5557"]}


# ---------------------------------------------------------------- the readiness probe, for real
PROBE = DEPLOY / "base" / "probe" / "ready.py"


def run_probe(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})


def metrics_url(proc) -> str:
    url = proc.info["metrics"]
    return url if url.endswith("/metrics") else url.rstrip("/") + "/metrics"


def test_readiness_probe_is_true_only_when_registered_with_weights(cluster):
    """ready.py against real roles: a registered worker with its weights is ready; one still
    waiting for the shards' weights is not; a name the master does not know is not."""
    cluster.start_master()
    shard = cluster.start_shards(1)
    ready = cluster.start_workers(1, "--metrics-port", "0", names=["ready"])[0]
    waiting = cluster.start_workers(1, "--metrics-port", "0", "--paramservers",
                                    ",".join(f"{n}={e}" for n, e in shard.items()), names=["waiting"], wait=False)[0]
    admin = {"RINGSERVE_ADMIN": cluster.admin}
    ok = run_probe({**admin, "RINGSERVE_METRICS_URL": metrics_url(ready), "RINGSERVE_WORKER_NAME": "ready"})
    assert ok.returncode == 0, ok.stderr
    no = run_probe({**admin, "RINGSERVE_METRICS_URL": metrics_url(waiting), "RINGSERVE_WORKER_NAME": "waiting"})
    assert no.returncode == 1 and "weights not loaded" in no.stderr, no.stderr
    stranger = run_probe({**admin, "RINGSERVE_METRICS_URL": metrics_url(ready), "RINGSERVE_WORKER_NAME": "other"})
    assert stranger.returncode == 1 and "not registered" in stranger.stderr, stranger.stderr
    silent = "tcp://127.0.0.1:9"  # a master that does not answer (restarting) is skipped, not required
    both = run_probe({"RINGSERVE_ADMIN": f"{silent},{cluster.admin}", "RINGSERVE_METRICS_URL": metrics_url(ready),
                      "RINGSERVE_WORKER_NAME": "ready"})
    assert both.returncode == 0, both.stderr
    none = run_probe({"RINGSERVE_ADMIN": silent, "RINGSERVE_METRICS_URL": metrics_url(ready),
                      "RINGSERVE_WORKER_NAME": "ready"})
    assert none.returncode == 1 and "no master answered" in none.stderr, none.stderr
    down = run_probe({"RINGSERVE_METRICS_URL": "http://127.0.0.1:9/metrics", "RINGSERVE_ADMIN": ""})
    assert down.returncode == 1 and "unreachable" in down.stderr, down.stderr


# ---------------------------------------------------------------- the preStop drain, for real
DRAIN = DEPLOY / "base" / "probe" / "drain.sh"
can_pid_ns = os.geteuid() == 0 and shutil.which("unshare") and shutil.which("nsenter")


@pytest.mark.skipif(not can_pid_ns, reason="needs root with unshare and nsenter (a PID namespace: the worker as PID 1)")
def test_prestop_drains_a_worker_running_as_pid_1(cluster):
    """drain.sh as the kubelet runs it (inside the container, where the worker is PID 1): the worker
    drains and leaves under load, every request is answered, and the script returns when it is gone."""
    import numpy as np

    from ringserve.client import Client
    from ringserve.client.admin import AdminClient
    from ringserve.launch.procs import wait_until

    cluster.start_master()
    cluster.start_workers(1, model="echo=ringserve.worker.demo:slow,arg.delay=0.02")
    log = open(cluster.tmp / "pid1-worker.log", "wb")
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m",
                              "ringserve.launch.worker", "--master", cluster.master.info["backend"], "--name", "pid1",
                              "--threads", "1", "--heartbeat-interval", "0.2", "--credit", "4",
                              "--model", "echo=ringserve.worker.demo:slow,arg.delay=0.02"],
                             stdout=log, stderr=log, start_new_session=True)
    try:
        admin = AdminClient(cluster.admin)
        wait_until(lambda: "pid1" in {w["name"] for w in admin.status()["workers"]}, 60, 0.1, "pid1 registered")
        child = int(Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()[0])
        with Client(cluster.frontend, timeout=60) as c:
            xs = [np.full((1, 4), float(i), np.float32) for i in range(300)]
            futures = [c.infer_async("echo", {"x": x}) for x in xs]
            wait_until(lambda: any(w["name"] == "pid1" and w["in_flight"] for w in admin.status()["workers"]),
                       30, 0.01, "pid1 holding requests")
            drained = subprocess.run(["nsenter", "--target", str(child), "--pid", "--mount", "/bin/sh", str(DRAIN)],
                                     env={**os.environ, "DRAIN_TIMEOUT": "30"}, capture_output=True, text=True,
                                     timeout=60)
            # 0, or SIGKILL: when PID 1 leaves, the kernel ends the rest of its namespace (the hook too),
            # as it does in a container; either way the script waited for the drain
            assert drained.returncode in (0, -9), drained.stderr
            assert outer.wait(10) == 0  # the worker (PID 1) left on its own: its namespace is gone
            for x, f in zip(xs, futures, strict=True):
                np.testing.assert_array_equal(f.result(timeout=60).outputs["y"], x)
        assert "pid1" not in {w["name"] for w in admin.status()["workers"]}
        assert b"worker_drained" in (cluster.tmp / "pid1-worker.log").read_bytes()
    finally:
        if outer.poll() is None:
            os.killpg(outer.pid, 9)
            outer.wait(5)
        log.close()
