"""AdminClient: talks to the master's admin socket (status, drain) and renders the status table."""
from __future__ import annotations

import zmq

from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.security import Security


class AdminClient:
    def __init__(self, address: str, timeout: float = 5.0, security: Security | None = None):
        self.address, self.timeout = address, timeout
        self.security = security or Security()  # Security(keys_dir, "admin") for a CURVE master
        # Several active masters (comma-separated): a command goes to the first that answers, starting
        # with the one that answered last (the gateway's status poll, wait_for_workers).
        self._endpoints = [a.strip() for a in address.split(",") if a.strip()] or [address]
        self._good = 0

    def call(self, cmd: str, **args) -> dict:
        last: TimeoutError | None = None
        for k in range(len(self._endpoints)):
            i = (self._good + k) % len(self._endpoints)
            try:
                reply = self._call(self._endpoints[i], cmd, **args)
            except TimeoutError as exc:
                last = exc
                continue
            self._good = i
            return reply
        raise last or TimeoutError(f"no answer from {self.address}")

    def _call(self, address: str, cmd: str, **args) -> dict:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            self.security.client(sock, "master")
            sock.connect(address)
            sock.send_multipart([b"", pack({"cmd": cmd, **args})])
            if not sock.poll(int(self.timeout * 1000)):
                raise TimeoutError(f"no answer from admin socket {address} in {self.timeout}s")
            return unpack_map(sock.recv_multipart()[-1])
        finally:
            sock.close(linger=0)

    def status(self) -> dict:
        return self.call("status")

    def drain(self, worker: str) -> dict:
        return self.call("drain", worker=worker)

    def route(self, model: str, split: str | None = None, sticky_key: str | None = None,
              shadow: int | None = None, promote: int | None = None, clear: bool = False) -> dict:
        """Set, promote or clear a model's traffic split between versions (see master/routing.py)."""
        args = {k: v for k, v in {"split": split, "sticky_key": sticky_key, "shadow": shadow,
                                  "promote": promote}.items() if v is not None}
        return self.call("route", model=model, clear=clear, **args)


def _model_text(info: dict) -> str:
    """A worker's model in the table: its state in words (made by the master), then dtype and int8.
    A master older than the `state` field: the version and readiness it sent."""
    state = info.get("state")
    if not isinstance(state, str):
        state = f"v{info.get('version')}" + ("" if info.get("ready", True) else ", not ready")
    extra = (f", {info['dtype']}" if info.get("dtype") not in (None, "float32") else "") + \
        (", int8" if info.get("quantize") else "")
    return f"{state}{extra}"


def _num(value, fmt: str = "{:.1f}") -> str:
    return "-" if not isinstance(value, (int, float)) else fmt.format(value)


def table(header: list[str], rows: list[list], right: set[int] = frozenset()) -> list[str]:
    """Columns as wide as their widest cell (numbers right-aligned), so long names never shift
    a column; the last column is free-form and left unpadded."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    out = []
    for r in cells:
        parts = [c.rjust(widths[k]) if k in right else c.ljust(widths[k]) for k, c in enumerate(r[:-1])]
        out.append("  ".join([*parts, r[-1]]).rstrip())
    return out


def format_status(st: dict) -> str:
    """A readable table of workers and models (models listed last: they may be long). REQ/S, P50 MS and
    P99 MS are the master's figures over the last minute (P50/P99 of answered results only)."""
    lines = [f"master epoch={st.get('epoch')} policy={st.get('policy')} uptime={st.get('uptime_s')}s "
             f"pending={st.get('pending')}"]
    peers = (st.get("master") or {}).get("peers") or []
    if peers:  # an active-active set: this master's view of the others
        lines.append("role=active peers: " + ", ".join(
            f"{p.get('endpoint')} ({p.get('state')}, {p.get('workers')} workers)" for p in peers))
    lines.append("")
    rows = []
    for w in st.get("workers", []):
        models = "; ".join(f"{m}: {_model_text(i)}" for m, i in w.get("models", {}).items())
        s = w.get("stats") or {}
        rows.append([w["name"], w["state"], w["device"], w["credit"], w["in_flight"], w["done"],
                     f"{w['heartbeat_age_s']:.2f}s", s.get("batches", 0), s.get("mean_batch_size", 0), models])
    lines += table(["WORKER", "STATE", "DEVICE", "CREDIT", "INFL", "DONE", "HB AGE", "BATCHES", "MEAN BS",
                    "MODELS"], rows, right={3, 4, 5, 6, 7, 8})
    refusals = [f"  {w['name']} {m}: {_model_text(i)}: {i['refused'].get('reason')}"
                for w in st.get("workers", []) for m, i in w.get("models", {}).items()
                if isinstance(i.get("refused"), dict)]
    if refusals:
        lines += ["", "REFUSED VERSIONS (the worker keeps what it served before)", *refusals]
    rows = []
    for name, m in st.get("models", {}).items():
        ready = f"{m['workers_ready']}/{m['workers']}" if isinstance(m.get("workers"), int) else "-"
        rows.append([name, m.get("state", "-"), ready, m["queue_depth"], m["in_flight"], m["requests"], m["ok"],
                     m["retries"], _num(m.get("rate_per_s")), _num(m.get("p50_ms")), _num(m.get("p99_ms")),
                     ",".join(map(str, m.get("versions") or [])) or "-",
                     ", ".join(f"{k}={v}" for k, v in sorted(m.get("errors", {}).items())) or "-"])
    lines += [""] + table(["MODEL", "STATE", "READY", "QUEUE", "INFL", "REQUESTS", "OK", "RETRIES", "REQ/S",
                           "P50 MS", "P99 MS", "VERSIONS", "ERRORS"], rows, right={2, 3, 4, 5, 6, 7, 8, 9, 10})
    for name, r in (st.get("routes") or {}).items():
        split = ", ".join(f"v{v}={p}%" for v, p in r.get("split", []))
        extra = "".join(f" {k}={r[k]}" for k in ("sticky_key", "shadow") if r.get(k) is not None)
        lines.append(f"route {name}: {split}{extra}")
    return "\n".join(lines)
