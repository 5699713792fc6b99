"""AdminClient: talks to the master's admin socket (status, drain) and renders the status table."""
from __future__ import annotations

import zmq

from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.security import Security


class AdminClient:
    def __init__(self, address: str, timeout: float = 5.0, security: Security | None = None):
        self.address, self.timeout = address, timeout
        self.security = security or Security()  # Security(keys_dir, "admin") for a CURVE master

    def call(self, cmd: str, **args) -> dict:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            self.security.client(sock, "master")
            sock.connect(self.address)
            sock.send_multipart([b"", pack({"cmd": cmd, **args})])
            if not sock.poll(int(self.timeout * 1000)):
                raise TimeoutError(f"no answer from admin socket {self.address} in {self.timeout}s")
            return unpack_map(sock.recv_multipart()[-1])
        finally:
            sock.close(linger=0)

    def status(self) -> dict:
        return self.call("status")

    def drain(self, worker: str) -> dict:
        return self.call("drain", worker=worker)


def format_status(st: dict) -> str:
    """A readable table of workers and models."""
    lines = [f"master epoch={st.get('epoch')} policy={st.get('policy')} uptime={st.get('uptime_s')}s "
             f"pending={st.get('pending')}", "",
             f"{'WORKER':<22} {'STATE':<9} {'DEVICE':<8} {'MODELS (version)':<28} {'CREDIT':>6} {'INFL':>5} "
             f"{'DONE':>7} {'HB AGE':>7} {'BATCHES':>8} {'MEAN BS':>7}"]
    for w in st.get("workers", []):
        models = ", ".join(f"{m}(v{i.get('version')}{'' if i.get('ready', True) else ',not ready'}"
                           f"{',' + i['dtype'] if i.get('dtype') not in (None, 'float32') else ''}"
                           f"{',int8' if i.get('quantize') else ''})" for m, i in w.get("models", {}).items())
        s = w.get("stats") or {}
        lines.append(f"{w['name']:<22} {w['state']:<9} {w['device']:<8} {models:<28} {w['credit']:>6} "
                     f"{w['in_flight']:>5} {w['done']:>7} {w['heartbeat_age_s']:>6.2f}s {s.get('batches', 0):>8} "
                     f"{s.get('mean_batch_size', 0):>7}")
    lines += ["", f"{'MODEL':<16} {'QUEUE':>6} {'INFL':>5} {'REQUESTS':>9} {'OK':>9} {'RETRIES':>8}  "
                  f"{'VERSIONS':<10} ERRORS"]
    for name, m in st.get("models", {}).items():
        errors = ", ".join(f"{k}={v}" for k, v in sorted(m.get("errors", {}).items())) or "-"
        lines.append(f"{name:<16} {m['queue_depth']:>6} {m['in_flight']:>5} {m['requests']:>9} {m['ok']:>9} "
                     f"{m['retries']:>8}  {str(m.get('versions')):<10} {errors}")
    return "\n".join(lines)
