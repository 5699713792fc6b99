"""ringserve-gateway's command line and duties: --help, --config, loopback-only plaintext,
API tokens (401, tenants, reload without restart), per-tenant rate limits, TLS.

Tests that need a cluster share one for the module (a rate-limited master, a worker serving the
MLP and a sequence encoder); each starts its own gateway. Command lines that must fail are run
side by side, each its own process, so the module's wall time is not their sum."""
from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import Cluster
from ringserve.launch.procs import RoleProcess, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("gateway-flags"))
    try:
        c.start_master("--rate-limit", "1", "--rate-burst", "2")
        c.start_workers(1, "--model", "enc=ringserve.worker.demo:seq_encoder")
        yield c
    finally:
        c.stop_all()


class Runs:
    """`python -m ringserve.launch.gateway ARGS` for each ARGS, all started at once; `results()` waits."""

    def __init__(self, argvs: list[list[str]]):
        self.argvs = argvs
        self.procs = [subprocess.Popen([sys.executable, "-m", "ringserve.launch.gateway", *a], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True) for a in argvs]

    def results(self, timeout: float = 60) -> list[subprocess.CompletedProcess]:
        try:
            out = []
            for a, p in zip(self.argvs, self.procs, strict=True):
                stdout, stderr = p.communicate(timeout=timeout)
                out.append(subprocess.CompletedProcess(a, p.returncode, stdout, stderr))
            return out
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def run_all(argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    return Runs(argvs).results()


def gateway(tmp_path, *args: str, label: str = "gw") -> RoleProcess:
    return RoleProcess("ringserve.launch.gateway", ["--listen", "127.0.0.1:0", "--status-interval", "0.2", *args],
                       tmp_path / f"{label}.log")


def call(url: str, body: bytes | None = None, headers: dict | None = None, context=None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=20, context=context) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [0.1] * 256}]}).encode()


def test_help_shows_defaults():
    out = subprocess.run([sys.executable, "-m", "ringserve.launch.gateway", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for flag in ("--master", "--listen", "--config", "--tokens", "--tls-cert", "--metrics-port", "--max-body-bytes"):
        assert flag in text
    assert "(default: tcp://127.0.0.1:5555)" in text and "(default: 127.0.0.1:8000)" in text


def test_plaintext_binds_only_to_loopback_unless_insecure(tmp_path):
    refused = subprocess.Popen([sys.executable, "-m", "ringserve.launch.gateway", "--listen", "0.0.0.0:0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        gw = gateway(tmp_path, "--listen", "0.0.0.0:0", "--insecure", "--admin", "tcp://127.0.0.1:1")
        _, stderr = refused.communicate(timeout=60)
    finally:
        if refused.poll() is None:
            refused.kill()
            refused.wait(5)
    assert refused.returncode == 2 and "refusing to bind" in stderr and "--tls-cert" in stderr
    try:
        port = gw.info["url"].rsplit(":", 1)[1]
        assert call(f"http://127.0.0.1:{port}/v2/health/live")[0] == 200
        assert call(f"http://127.0.0.1:{port}/v2/health/ready")[0] == 503  # no master there
        assert "INSECURE" in gw.log_path.read_text()
    finally:
        gw.stop()
    assert gw.proc.returncode == 0 and "gateway_stopped" in gw.log_path.read_text()  # SIGTERM: a clean exit


def test_config_file_and_bad_flags(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[master]\nmax-queue = 5\n[gateway]\nlisten = "127.0.0.1:0"\nmax-body-bytes = 1000\n')
    bad = ((["--listen", "nohost"], "HOST:PORT"), (["--tls-cert", "c.pem"], "go together"),
           (["--tls-cert", str(cfg), "--tls-key", str(cfg)], "--tls-cert/--tls-key"),
           (["--tokens", str(tmp_path / "missing")], "--tokens"))
    runs = Runs([args for args, _ in bad])  # side by side with the gateway below
    try:
        gw = RoleProcess("ringserve.launch.gateway", ["--config", str(cfg), "--admin", "tcp://127.0.0.1:1"],
                         tmp_path / "cfg.log")
    except BaseException:
        runs.kill()
        raise
    try:
        status, _, body = call(gw.info["url"] + "/v2/models/m/infer", b"x" * 2000)
        assert status == 413 and "1000" in json.loads(body)["error"]
    finally:
        gw.stop()
    for (_, text), out in zip(bad, runs.results(), strict=True):
        assert out.returncode == 2 and text in out.stderr, out.stderr


def _self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


def test_tokens_tenants_rate_limits_and_tls(shared, tmp_path):
    cluster = shared
    cert, key = _self_signed(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("# token tenant\nalpha-token-0123456789 alpha\nbravo-token-0123456789 bravo\n")
    gw = gateway(tmp_path, "--master", cluster.frontend, "--admin", cluster.admin, "--tokens", str(tokens),
                 "--tls-cert", str(cert), "--tls-key", str(key), "--listen", "0.0.0.0:0",  # TLS: may leave loopback
                 "--grpc-listen", "127.0.0.1:0")
    url = "https://127.0.0.1:" + gw.info["url"].rsplit(":", 1)[1]
    assert gw.info["url"].startswith("https://")
    tls = ssl.create_default_context(cafile=str(cert))
    tls.check_hostname = False
    try:
        assert call(url + "/v2/health/live", context=tls)[0] == 200  # probes need no token
        status, headers, body = call(url + "/v2/models/mlp/infer", BODY, context=tls)
        assert status == 401 and "Bearer" in headers.get("www-authenticate", "")
        assert "token" in json.loads(body)["error"]
        assert call(url + "/v2/models/mlp/infer", BODY, {"Authorization": "Bearer wrong-token-000000000"},
                    context=tls)[0] == 401
        alpha = {"Authorization": "Bearer alpha-token-0123456789"}
        bravo = {"Authorization": "Bearer bravo-token-0123456789"}
        codes = [call(url + "/v2/models/mlp/infer", BODY, alpha, context=tls)[0] for _ in range(6)]
        assert codes[0] == 200 and 429 in codes, codes  # alpha spent its bucket (burst 2, 1/s) ...
        assert call(url + "/v2/models/mlp/infer", BODY, bravo, context=tls)[0] == 200  # ... bravo has its own
        time.sleep(0.01)
        tokens.write_text("bravo-token-0123456789 bravo\ncharlie-token-0123456789 charlie\n")  # reloaded, no restart
        charlie = {"Authorization": "Bearer charlie-token-0123456789"}
        wait_until(lambda: call(url + "/v2/models/mlp", None, charlie, context=tls)[0] == 200, 10,
                   what="new token accepted")
        assert call(url + "/v2/models/mlp", None, alpha, context=tls)[0] == 401
        _grpc_tokens_over_tls(gw.info["grpc"], cert)
        with pytest.raises(OSError):  # plaintext to a TLS port gets nothing useful
            urllib.request.urlopen("http://127.0.0.1:" + url.rsplit(":", 1)[1] + "/v2/health/live", timeout=5)
    finally:
        gw.stop()


def test_curve_keys_to_the_master(cluster, tmp_path):
    """--keys: requests go over CURVE with a client key and the status with an admin key."""
    from ringserve.protocol.security import Security, create_identity

    keys = tmp_path / "keys"
    for role, name in (("master", "m"), ("worker", "w0"), ("client", "gw"), ("admin", "gw")):
        create_identity(keys, role, name)
    cluster.start_master("--keys", str(keys))
    cluster.start_workers(1, "--keys", str(keys), "--key-name", "w0", names=["w0"], wait=False)
    from ringserve.launch.procs import wait_for_workers

    wait_for_workers(cluster.admin, 1, 60, security=Security(str(keys), "admin"))
    gw = gateway(tmp_path, "--master", cluster.frontend, "--admin", cluster.admin, "--keys", str(keys),
                 "--key-name", "gw", "--admin-key-name", "gw", label="curve")
    try:
        wait_until(lambda: call(gw.info["url"] + "/v2/health/ready")[0] == 200, 20, what="ready over CURVE")
        status, _, body = call(gw.info["url"] + "/v2/models/mlp/infer", BODY)
        assert status == 200 and json.loads(body)["outputs"][0]["shape"] == [1, 10]
    finally:
        gw.stop()


def test_a_port_in_use_is_one_clear_line_naming_the_flag():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        flags = ("--listen", "--grpc-listen")
        argvs = [["--admin", "tcp://127.0.0.1:1", "--status-interval", "0.2",
                  *(["--listen", f"127.0.0.1:{port}"] if flag == "--listen" else
                    ["--listen", "127.0.0.1:0", "--grpc-listen", f"127.0.0.1:{port}"])] for flag in flags]
        for flag, out in zip(flags, run_all(argvs), strict=True):
            assert out.returncode == 2 and f"choose another with {flag}" in out.stderr, out.stderr[-2000:]
            assert "Traceback" not in out.stderr


def _grpc_tokens_over_tls(address: str, cert) -> None:
    tritongrpc = pytest.importorskip("tritonclient.grpc")
    import numpy as np
    from tritonclient.utils import InferenceServerException

    client = tritongrpc.InferenceServerClient(address, ssl=True, root_certificates=str(cert))
    try:
        x = tritongrpc.InferInput("x", [1, 256], "FP32")
        x.set_data_from_numpy(np.ones((1, 256), np.float32))
        with pytest.raises(InferenceServerException) as err:
            client.infer("mlp", [x])
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        result = client.infer("mlp", [x], headers={"authorization": "Bearer bravo-token-0123456789"})
        assert result.as_numpy("logits").shape == (1, 10)
    finally:
        client.close()


def test_model_metadata_lists_the_inputs_the_module_declares(shared):
    """Workers announce their module's input_spec, so metadata is right before any request was made."""
    cluster = shared
    gw = RoleProcess("ringserve.launch.gateway", ["--master", cluster.frontend, "--admin", cluster.admin,
                                                  "--listen", "127.0.0.1:0"], cluster.tmp / "gw-meta.log")

    def meta():
        try:
            with urllib.request.urlopen(f"{gw.info['url']}/v2/models/enc", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            return None

    try:
        got = wait_until(lambda: (m := meta()) and m.get("inputs") and m, 20, 0.2, "metadata with inputs")
    finally:
        gw.stop()
    assert {i["name"]: (i["datatype"], i["shape"]) for i in got["inputs"]} == {
        "input_ids": ("INT64", [-1, -1]), "attention_mask": ("INT64", [-1, -1])}
