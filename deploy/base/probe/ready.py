"""Worker readiness probe (exec): ready only when this worker's weights are loaded AND the master
has it registered with every model ready. Exit 0: ready; 1: not ready (the reason on stderr).

Why an exec probe: the worker has no HTTP health endpoint, and it cannot know on its own whether
the master took its READY. So the probe asks the two sides that know:
  1. the worker's own metrics on loopback: every `ringserve_model_ready` sample is 1;
  2. the masters' admin status (ringserve.client.admin.AdminClient): on every master that answers
     (at least one), a worker named RINGSERVE_WORKER_NAME is registered, not draining, and every
     one of its models is "ready vN".
Environment: RINGSERVE_METRICS_URL (default http://127.0.0.1:9101/metrics),
RINGSERVE_METRICS_TOKEN_FILE (bearer token, with TLS: the secure overlay), RINGSERVE_ADMIN
(the masters' admin endpoints, comma-separated; empty: skip check 2), RINGSERVE_PROBE_KEYS (a keys dir with
an admin key, for a CURVE master), RINGSERVE_WORKER_NAME (default: $POD_NAME).
Bounded: each check has a 2 s timeout, under the probe's timeoutSeconds.
"""
import os
import ssl
import sys
import urllib.request


def local_models_ready() -> str | None:
    url = os.environ.get("RINGSERVE_METRICS_URL", "http://127.0.0.1:9101/metrics")
    req = urllib.request.Request(url)
    token_file = os.environ.get("RINGSERVE_METRICS_TOKEN_FILE")
    if token_file:
        req.add_header("Authorization", "Bearer " + open(token_file).read().strip())
    ctx = ssl._create_unverified_context() if url.startswith("https:") else None  # loopback, own cert
    try:
        text = urllib.request.urlopen(req, timeout=2, context=ctx).read().decode()
    except OSError as exc:
        return f"worker metrics unreachable at {url}: {exc}"
    ready = [line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("ringserve_model_ready{")]
    if not ready:
        return "no model reported yet"
    waiting = [name for name, value in ready if float(value) != 1.0]
    return f"weights not loaded: {', '.join(waiting)}" if waiting else None


def registered() -> str | None:
    addresses = [a.strip() for a in os.environ.get("RINGSERVE_ADMIN", "tcp://ringserve-master:5557").split(",")
                 if a.strip()]
    if not addresses:
        return None
    from ringserve.client.admin import AdminClient
    from ringserve.protocol.security import Security

    name = os.environ.get("RINGSERVE_WORKER_NAME") or os.environ.get("POD_NAME", "")
    keys = os.environ.get("RINGSERVE_PROBE_KEYS") or None
    answered = 0
    for address in addresses:  # several active masters: ready on every one that answers
        try:
            status = AdminClient(address, timeout=2.0, security=Security(keys, "admin") if keys else None).status()
        except Exception:  # noqa: BLE001 - a master that does not answer is skipped (it may be restarting)
            continue
        answered += 1
        why = _ready_on(status, name, address)
        if why:
            return why
    return None if answered else f"no master answered ({', '.join(addresses)})"


def _ready_on(status: dict, name: str, address: str) -> str | None:
    mine = [w for w in status.get("workers", []) if w.get("name") == name]
    if not mine:
        return f"worker {name!r} is not registered with the master at {address}"
    for w in mine:
        models = w.get("models", {})
        if w.get("state") != "draining" and models and all(
                str(m.get("state", "")).startswith("ready") for m in models.values()):
            return None
    return f"worker {name!r} is registered at {address} but draining or not every model is ready"


def main() -> int:
    for check in (local_models_ready, registered):
        why = check()
        if why:
            print(f"not ready: {why}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
