"""--metrics-port for every role: serve a role's Prometheus registry over HTTP.

Off by default. Port 0 takes an ephemeral port; the URL is returned so the role can
announce it (ringserve-local prints it, tests scrape it).
"""
from __future__ import annotations

import argparse

from prometheus_client import CollectorRegistry, start_http_server

from ringserve.protocol.sockets import BindError


def add_metrics_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics over HTTP on this port (0: any free port; default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics endpoint binds")


def start_metrics(registry: CollectorRegistry, port: int | None, host: str = "127.0.0.1") -> str | None:
    """Start the HTTP exporter in a daemon thread; return its URL, or None when off."""
    if port is None:
        return None
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise BindError(f"http://{host}:{port}", exc.strerror or str(exc)) from None
    return f"http://{host}:{server.server_port}/metrics"
