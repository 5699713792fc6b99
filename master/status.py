"""The admin status view: plain data built from the broker's records (msgpack-able).

Its size is bounded by what the master keeps: models some worker serves (names clients ask
for are not listed: they are counted in `unknown_model_requests`) and validated worker data.
"""
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
    in_flight: dict[str, int] = {}
    for r in broker.pending.values():
        if r.worker is not None:
            in_flight[r.model] = in_flight.get(r.model, 0) + 1
    models = {}
    for name in sorted(set(broker.counters) | set(broker.queues.models())
                       | {m for w in broker.workers.values() for m in w.models}):
        c = broker.counters.get(name)
        models[name] = {
            "queue_depth": broker.queues.depth(name),
            "in_flight": in_flight.get(name, 0),
            "requests": c.requests if c else 0,
            "ok": c.ok if c else 0,
            "errors": dict(c.errors) if c else {},
            "retries": c.retries if c else 0,
            "versions": sorted(set().union(*(w.versions(name) for w in broker.workers.values()))),
        }
    return {
        "epoch": broker.epoch,
        "policy": broker.cfg.policy,
        "uptime_s": round(time.time() - broker.started, 1),
        "stopping": broker.stopping,
        "pending": len(broker.pending),
        "late_replies_dropped": broker.late_replies,
        "bad_worker_messages": broker.bad_worker_messages,
        "unknown_model_requests": broker.unknown_model_requests,
        "answer_cache": {"ids": len(broker.answered), "replies": broker.answered.replies_held,
                         "bytes": broker.answered.bytes},
        "books": broker.books(),
        "workers": workers,
        "models": models,
        "routes": {m: r.to_json() for m, r in broker.routes.items()},
    }
