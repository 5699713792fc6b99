"""--metrics-port for every role: serve a role's Prometheus registry over HTTP(S).

Off by default. Port 0 takes an ephemeral port; the URL is returned so the role can
announce it (ringserve-local prints it, tests scrape it).

The endpoint is read-only but says a lot (model names, rates, worker names), and CURVE keys do
not cover HTTP. So a non-loopback `--metrics-host` is refused unless the endpoint is
protected: TLS (`--metrics-tls-cert`/`--metrics-tls-key`, Python's ssl module) and a bearer
token (`--metrics-token-file`, compared in constant time), or the operator says `--insecure`.
Everything is checked when the role starts (one line, exit 2), before anything binds.
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, make_wsgi_app

from ringserve.protocol.sockets import BindError

log = structlog.get_logger("ringserve.metrics")

MIN_TOKEN_CHARS = 16
REQUEST_TIMEOUT_S = 10.0  # a scrape connection idle this long (TLS handshake included) is closed


class MetricsConfigError(ValueError):
    """The metrics flags cannot be used as given (one line for the operator)."""


@dataclass(frozen=True)
class MetricsAccess:
    """How the endpoint is protected: a TLS context and/or the bearer token scrapes must send."""

    tls: ssl.SSLContext | None = None
    token: bytes | None = None

    @property
    def protected(self) -> bool:
        return self.tls is not None and self.token is not None


def add_metrics_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics over HTTP on this port (0: any free port; default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics endpoint binds; beyond loopback it needs --metrics-tls-cert, "
                        "--metrics-tls-key and --metrics-token-file, or --insecure (docs/security.md)")
    p.add_argument("--metrics-tls-cert", default=None, metavar="PEM",
                   help="serve metrics over HTTPS with this certificate (chain)")
    p.add_argument("--metrics-tls-key", default=None, metavar="PEM", help="the private key of --metrics-tls-cert")
    p.add_argument("--metrics-token-file", default=None, metavar="FILE",
                   help="scrapes must send 'Authorization: Bearer TOKEN', TOKEN being this file's content "
                        "(Prometheus: authorization.credentials_file)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name, or "" / 0.0.0.0 style wildcards: reachable from elsewhere


def metrics_access(args: argparse.Namespace) -> MetricsAccess:
    """Check the metrics flags and load what they name (raises MetricsConfigError)."""
    cert, key = getattr(args, "metrics_tls_cert", None), getattr(args, "metrics_tls_key", None)
    token_file = getattr(args, "metrics_token_file", None)
    tls = token = None
    if (cert is None) != (key is None):
        raise MetricsConfigError("--metrics-tls-cert and --metrics-tls-key go together")
    if cert is not None:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise MetricsConfigError(f"--metrics-tls-cert {cert} / --metrics-tls-key {key}: "
                                     f"{getattr(exc, 'strerror', None) or exc}") from None
    if token_file is not None:
        try:
            with open(token_file, "rb") as f:
                token = f.read(4096).strip()
        except OSError as exc:
            raise MetricsConfigError(f"--metrics-token-file {token_file}: {exc.strerror or exc}") from None
        if len(token) < MIN_TOKEN_CHARS or not all(33 <= b < 127 for b in token):
            raise MetricsConfigError(f"--metrics-token-file {token_file}: the token must be at least "
                                     f"{MIN_TOKEN_CHARS} printable characters without spaces "
                                     "(e.g. openssl rand -hex 32)")
    return MetricsAccess(tls, token)


def check_metrics_flags(args: argparse.Namespace) -> str | None:
    """At start: refuse an exposed, unprotected endpoint unless --insecure. Returns a warning to
    log, or None; raises MetricsConfigError."""
    if getattr(args, "metrics_port", None) is None:
        return None
    host = getattr(args, "metrics_host", "127.0.0.1")
    access = metrics_access(args)
    if is_loopback(host) or access.protected:
        return None
    missing = " and ".join(what for what, have in (("TLS (--metrics-tls-cert/--metrics-tls-key)", access.tls),
                                                    ("a token (--metrics-token-file)", access.token)) if not have)
    if not getattr(args, "insecure", False):
        raise MetricsConfigError(f"refusing to serve metrics on {host} without {missing} (anyone who can reach it "
                                 f"could read them); add them, use --metrics-host 127.0.0.1, or pass --insecure")
    return f"INSECURE: metrics on {host}:{args.metrics_port} are reachable beyond this host without {missing}"


def start_metrics(registry: CollectorRegistry, port: int | None, host: str = "127.0.0.1",
                  access: MetricsAccess | None = None) -> str | None:
    """Start the exporter in a daemon thread; return its URL, or None when off."""
    if port is None:
        return None
    access = access or MetricsAccess()
    try:
        server = _make_server(host, port, _guarded(make_wsgi_app(registry), access.token), access.tls)
    except OSError as exc:
        raise BindError(f"http://{host}:{port}", exc.strerror or str(exc)) from None
    threading.Thread(target=server.serve_forever, name="ringserve-metrics", daemon=True).start()
    scheme = "https" if access.tls is not None else "http"
    return f"{scheme}://{host}:{server.server_port}/metrics"


def _guarded(app, token: bytes | None):
    """The WSGI app, behind a bearer token when one is set (hmac.compare_digest: constant time)."""
    if token is None:
        return app
    expected = b"Bearer " + token

    def guarded(environ, start_response):
        given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                                ("WWW-Authenticate", 'Bearer realm="ringserve metrics"')])
            return [b"a bearer token is required (Authorization: Bearer ...)\n"]
        return app(environ, start_response)

    return guarded


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # StreamRequestHandler sets it on the connection

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):  # in this connection's thread, bounded in time
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per scrape on stderr would drown the role's structured log


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A plaintext request to the TLS port, a dropped scrape: the client's problem, one log line.
        log.info("metrics_request_failed", peer=str(client_address[0]))


def _make_server(host: str, port: int, app, tls: ssl.SSLContext | None) -> WSGIServer:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("MetricsServer", (_Server,), {"address_family": family})
    server = make_server(host.strip("[]"), port, app, server_class, _Handler)
    if tls is not None:  # the handshake runs in each connection's thread (_Handler.setup), never in accept
        server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server
