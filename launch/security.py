"""The security flags every role takes, in one place: --keys, --key-name, --insecure, --max-msg-bytes."""
from __future__ import annotations

import argparse
import sys
from typing import Iterable

import structlog

from ringserve.launch.metrics import MetricsConfigError, check_metrics_flags
from ringserve.protocol.security import DEFAULT_MAX_MSG_BYTES, Security, SecurityError, check_bind


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("security (see docs/security.md)")
    g.add_argument("--keys", default=None, metavar="DIR",
                   help="keys directory made by ringserve-keys: CURVE-encrypt and authenticate every socket "
                        "(default: none, plaintext, loopback binds only)")
    g.add_argument("--key-name", default=None, metavar="NAME",
                   help="which of this role's keys to use (default: the only one in DIR/secret/ROLE)")
    g.add_argument("--insecure", action="store_true",
                   help="allow binding a non-loopback address without --keys, or metrics without TLS and a "
                        "token (logs a loud warning)")
    g.add_argument("--max-msg-bytes", type=int, default=DEFAULT_MAX_MSG_BYTES,
                   help="ZMQ_MAXMSGSIZE on every socket: a larger message drops its peer")


def security_from_args(args: argparse.Namespace, role: str, binds: Iterable[str] = (),
                       default_name: str | None = None) -> Security:
    """Build the role's Security; refuse (exit 2) a plaintext non-loopback bind, or metrics exposed beyond
    loopback without TLS and a token (launch/metrics.py), without --insecure."""
    log = structlog.get_logger("ringserve.security")
    sec = Security(args.keys, role, args.key_name or default_name, args.max_msg_bytes, args.insecure)
    binds = list(binds)
    try:
        try:  # the metrics endpoint (HTTP, not covered by CURVE) is checked with the sockets, before any bind
            metrics_warning = check_metrics_flags(args)
        except MetricsConfigError as exc:
            raise SecurityError(str(exc)) from None
        if metrics_warning:
            log.warning("insecure_metrics", message=metrics_warning)
            print(f"WARNING: {metrics_warning}", file=sys.stderr, flush=True)
        for endpoint in binds:
            warning = check_bind(endpoint, sec.enabled, args.insecure)
            if warning:
                log.warning("insecure_bind", endpoint=endpoint, message=warning)
                print(f"WARNING: {warning}", file=sys.stderr, flush=True)
        if sec.enabled:
            sec.own_keys()  # fail at start, not at the first connection
        if not binds:  # a command-line client: nothing to announce
            return sec
        if sec.enabled:
            log.info("security", mode="curve", keys=args.keys, role=role)
        else:
            log.warning("security", mode="plaintext",
                        message="no --keys: sockets are unauthenticated and unencrypted; binding loopback only"
                        if not args.insecure else "no --keys and --insecure: anyone who can reach a port can use it")
    except SecurityError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    return sec
