"""The metrics endpoint beyond loopback: refused (one line, exit 2) unless it has TLS and a bearer
token, or --insecure; with TLS a scrape works over HTTPS with the certificate and plaintext gets
nothing; with a token a scrape without it (or with another) gets 401."""
from __future__ import annotations

import argparse
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from ringserve.launch.metrics import MetricsConfigError, check_metrics_flags, is_loopback, metrics_access

pytestmark = pytest.mark.timeout(120)

EPH = "tcp://127.0.0.1:*"
TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl, as an operator would make one)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "metrics.crt", d / "metrics.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True, timeout=60)
    return str(crt), str(key)


@pytest.fixture
def token_file(tmp_path) -> str:
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    return str(p)


def flags(**kw) -> argparse.Namespace:
    base = {"metrics_port": 0, "metrics_host": "127.0.0.1", "metrics_tls_cert": None, "metrics_tls_key": None,
            "metrics_token_file": None, "insecure": False}
    return argparse.Namespace(**{**base, **kw})


def test_exposed_metrics_need_tls_and_a_token_or_insecure(cert, token_file, tmp_path):
    crt, key = cert
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.0.0.5")
    assert check_metrics_flags(flags()) is None
    assert check_metrics_flags(flags(metrics_port=None, metrics_host="0.0.0.0")) is None  # metrics off
    with pytest.raises(MetricsConfigError, match="without TLS .* and a token"):
        check_metrics_flags(flags(metrics_host="0.0.0.0"))
    with pytest.raises(MetricsConfigError, match="without a token"):
        check_metrics_flags(flags(metrics_host="0.0.0.0", metrics_tls_cert=crt, metrics_tls_key=key))
    with pytest.raises(MetricsConfigError, match="without TLS"):
        check_metrics_flags(flags(metrics_host="0.0.0.0", metrics_token_file=token_file))
    assert check_metrics_flags(flags(metrics_host="0.0.0.0", metrics_tls_cert=crt, metrics_tls_key=key,
                                     metrics_token_file=token_file)) is None
    assert "INSECURE" in check_metrics_flags(flags(metrics_host="0.0.0.0", insecure=True))
    with pytest.raises(MetricsConfigError, match="go together"):
        metrics_access(flags(metrics_tls_cert=crt))
    with pytest.raises(MetricsConfigError, match="--metrics-tls-cert"):
        metrics_access(flags(metrics_tls_cert=key, metrics_tls_key=key))  # not a certificate
    (tmp_path / "short").write_text("secret")
    with pytest.raises(MetricsConfigError, match="at least 16"):
        metrics_access(flags(metrics_token_file=str(tmp_path / "short")))
    assert metrics_access(flags(metrics_token_file=token_file)).token == TOKEN.encode()


@pytest.mark.parametrize("module,args", [
    ("ringserve.launch.master", ["--frontend", EPH, "--backend", EPH, "--admin", EPH]),
    ("ringserve.launch.worker", ["--model", "mlp=ringserve.worker.demo:mlp", "--master", "tcp://127.0.0.1:1"]),
])
def test_role_refuses_exposed_unprotected_metrics_in_one_line(module, args):
    out = subprocess.run([sys.executable, "-m", module, *args, "--metrics-port", "0", "--metrics-host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refusing to serve metrics on 0.0.0.0" in errors[0] and "--insecure" in errors[0]
    assert "Traceback" not in out.stderr


def scrape(url: str, token: str | None = None, cafile: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    ctx = ssl.create_default_context(cafile=cafile) if cafile else None
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_tls_and_token_protect_the_scrape(cluster, cert, token_file):
    crt, key = cert
    cluster.start_master("--metrics-port", "0", "--metrics-tls-cert", crt, "--metrics-tls-key", key,
                         "--metrics-token-file", token_file)
    url = cluster.master.info["metrics"]
    assert url.startswith("https://127.0.0.1:")
    status, body = scrape(url, TOKEN, cafile=crt)
    assert status == 200 and "ringserve_" in body
    assert scrape(url, None, cafile=crt)[0] == 401  # no token
    assert scrape(url, "f" * 32, cafile=crt)[0] == 401  # another token
    with pytest.raises(urllib.error.URLError):  # the certificate is not trusted without it
        scrape(url, TOKEN)
    plain = url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):  # plaintext gets no metrics
        scrape(plain, TOKEN)
    status, _ = scrape(url, TOKEN, cafile=crt)  # the endpoint still serves after the bad requests
    assert status == 200


def test_token_without_tls_on_loopback(cluster, token_file):
    cluster.start_master("--metrics-port", "0", "--metrics-token-file", token_file)
    url = cluster.master.info["metrics"]
    assert url.startswith("http://127.0.0.1:")
    assert scrape(url)[0] == 401
    status, body = scrape(url, TOKEN)
    assert status == 200 and "ringserve_" in body
