"""The admin status view: plain data built from the broker's records (msgpack-able)."""
from __future__ import annotations

import time


def build_status(broker, now: float) -> dict:
    workers = []
    for w in sorted(broker.workers.values(), key=lambda w: w.name):
        workers.append({
            "name": w.name,
            "id": w.ident.hex(),
            "pid": w.pid,
            "device": w.device,
            "state": w.display_state,
            "models": w.models,
            "credit": w.credit,
            "weight": w.weight,
            "in_flight": len(w.in_flight),
            "done": w.done,
            "heartbeat_age_s": round(now - w.last_seen, 3),
            "stats": w.stats,
        })
    models = {}
    for name in sorted(set(broker.counters) | set(broker.queues.models())
                       | {m for w in broker.workers.values() for m in w.models}):
        c = broker.counters.get(name)
        models[name] = {
            "queue_depth": broker.queues.depth(name),
            "in_flight": sum(1 for r in broker.pending.values() if r.model == name and r.worker is not None),
            "requests": c.requests if c else 0,
            "ok": c.ok if c else 0,
            "errors": dict(c.errors) if c else {},
            "retries": c.retries if c else 0,
            "versions": sorted({w.models[name].get("version") for w in broker.workers.values()
                                if name in w.models and w.models[name].get("version") is not None}),
        }
    return {
        "epoch": broker.epoch,
        "policy": broker.cfg.policy,
        "uptime_s": round(time.time() - broker.started, 1),
        "stopping": broker.stopping,
        "pending": len(broker.pending),
        "late_replies_dropped": broker.late_replies,
        "workers": workers,
        "models": models,
        "routes": {m: r.to_json() for m, r in broker.routes.items()},
    }
