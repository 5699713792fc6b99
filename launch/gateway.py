"""ringserve-gateway: the Open Inference Protocol (KServe v2) over HTTP in front of a master.

Stateless; run as many as you like. It sends requests to the master's client endpoint with
ringserve's AsyncClient and reads the admin endpoint's status for health and model metadata.
Without --tls-cert/--tls-key it speaks plaintext HTTP and binds only to loopback unless
--insecure. With --tokens FILE every /v2/models/... call needs `Authorization: Bearer TOKEN`
(the file holds `TOKEN TENANT` lines and is re-read when it changes). See docs/gateway.md.
"""
from __future__ import annotations

import argparse
import ssl
import sys

import orjson
import structlog

from ringserve.gateway.app import AppConfig
from ringserve.gateway.auth import TokenError
from ringserve.gateway.metrics import GatewayMetrics
from ringserve.gateway.server import GatewayConfig, serve
from ringserve.launch.cli import bind_error_exit, make_parser, parse_args, positive_float, positive_int
from ringserve.launch.logsetup import add_log_flag, configure_logging
from ringserve.launch.metrics import add_metrics_flags, start_metrics
from ringserve.launch.procs import announce
from ringserve.protocol.security import DEFAULT_MAX_MSG_BYTES, Security, SecurityError, check_bind
from ringserve.protocol.sockets import BindError


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets); port 0 takes any free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def parser() -> argparse.ArgumentParser:
    p = make_parser("ringserve-gateway", __doc__)
    p.add_argument("--master", default="tcp://127.0.0.1:5555",
                   help="the master's client endpoint; several active masters: comma-separated (requests fail "
                        "over between them)")
    p.add_argument("--admin", default="tcp://127.0.0.1:5557",
                   help="the master's admin endpoint (health and model metadata come from its status); several: "
                        "comma-separated, the first that answers")
    p.add_argument("--listen", type=host_port, default="127.0.0.1:8000", metavar="HOST:PORT",
                   help="HTTP address (port 0: any free port)")
    p.add_argument("--grpc-listen", type=host_port, default=None, metavar="HOST:PORT",
                   help="also serve the OIP gRPC service here (port 0: any free port; default: off)")
    p.add_argument("--max-body-bytes", type=positive_int, default=64 << 20,
                   help="largest request body (after decompression); larger is 413")
    p.add_argument("--max-json-bytes", type=positive_int, default=8 << 20,
                   help="largest JSON part of a request (JSON tensors become Python objects many times their "
                        "size); larger is 413: send big tensors as binary data")
    p.add_argument("--body-timeout", type=positive_float, default=30.0,
                   help="seconds for a request body to arrive; slower is 408")
    p.add_argument("--default-timeout", type=positive_float, default=30.0,
                   help="seconds, for requests without a 'timeout' parameter")
    p.add_argument("--max-timeout", type=positive_float, default=300.0, help="seconds; longer timeouts are capped")
    p.add_argument("--max-connections", type=positive_int, default=4096,
                   help="concurrent connections and requests; beyond, 503")
    p.add_argument("--keep-alive", type=positive_float, default=30.0, help="seconds an idle connection is kept")
    p.add_argument("--status-interval", type=positive_float, default=1.0,
                   help="seconds between reads of the master's status")
    p.add_argument("--tokens", default=None, metavar="FILE",
                   help="API tokens file (TOKEN TENANT per line, re-read on change); default: no authentication")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="TLS certificate chain (with --tls-key: HTTPS)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="TLS private key")
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per HTTP request")
    g = p.add_argument_group("master connection security (see docs/security.md)")
    g.add_argument("--keys", default=None, metavar="DIR",
                   help="keys directory made by ringserve-keys: CURVE to the master (default: plaintext)")
    g.add_argument("--key-name", default=None, metavar="NAME", help="which client key to use for requests")
    g.add_argument("--admin-key-name", default=None, metavar="NAME",
                   help="which admin key to use for the status (default: the only one)")
    g.add_argument("--insecure", action="store_true",
                   help="allow plaintext HTTP (no --tls-cert) on a non-loopback address (logs a loud warning)")
    g.add_argument("--max-msg-bytes", type=int, default=DEFAULT_MAX_MSG_BYTES,
                   help="ZMQ_MAXMSGSIZE on the master connections")
    add_metrics_flags(p)
    add_log_flag(p)
    return p


def fast_json_logs() -> None:
    """The same one-JSON-object-per-line logs as every role, rendered by orjson: an access log
    line per request costs the gateway several times less CPU than with the json module."""
    processors = list(structlog.get_config()["processors"])
    if processors and isinstance(processors[-1], structlog.processors.JSONRenderer):
        processors[-1] = structlog.processors.JSONRenderer(
            serializer=lambda obj, **kw: orjson.dumps(obj, default=str).decode())
        structlog.configure(processors=processors)


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = parse_args(p, argv)
    configure_logging("gateway", args.log_level)
    fast_json_logs()
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    host, port = args.listen
    if args.tls_cert:
        try:  # a bad certificate or key is one line at start, not a traceback from the server
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"error: --tls-cert/--tls-key: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
    try:
        for h, pt in [(host, port)] + ([args.grpc_listen] if args.grpc_listen else []):
            warning = check_bind(f"tcp://{h}:{pt}", bool(args.tls_cert), args.insecure)
            if warning:
                print(f"WARNING: {warning.replace('tcp://', 'http://')}", file=sys.stderr, flush=True)
        client_sec = Security(args.keys, "client", args.key_name, args.max_msg_bytes)
        admin_sec = Security(args.keys, "admin", args.admin_key_name, args.max_msg_bytes)
        if args.keys:
            client_sec.own_keys()
            admin_sec.own_keys()
    except SecurityError as exc:
        message = str(exc).replace("without --keys", "without --tls-cert/--tls-key").replace(
            "give --keys DIR", "give --tls-cert and --tls-key")
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    grpc_host, grpc_port = args.grpc_listen or (None, 0)
    cfg = GatewayConfig(master=args.master, admin=args.admin, host=host, port=port, grpc_host=grpc_host,
                        grpc_port=grpc_port,
                        app=AppConfig(args.max_body_bytes, args.max_json_bytes, args.body_timeout, args.default_timeout,
                                      args.max_timeout, access_log=not args.no_access_log),
                        tokens=args.tokens, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        status_interval=args.status_interval, max_connections=args.max_connections,
                        keep_alive_s=args.keep_alive, client_security=client_sec, admin_security=admin_sec)
    metrics = GatewayMetrics()
    try:
        metrics_url = start_metrics(metrics.registry, args.metrics_port, args.metrics_host)
        serve(cfg, announce, metrics, {"metrics": metrics_url} if metrics_url else {})
    except BindError as exc:
        bind_error_exit(exc, {"--listen": f"http://{host}:{port}", "--grpc-listen": exc.endpoint
                              if exc.endpoint.startswith("grpc://") else None,
                              "--metrics-port": f"http://{args.metrics_host}:{args.metrics_port}"})
    except TokenError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
