"""The admin status view: plain data built from the broker's records (msgpack-able).

Its size is bounded by what the master keeps: models some worker serves (names clients ask
for are not listed: they are counted in `unknown_model_requests`) and validated worker data.

Each model on each worker gets a `state` in words, made from what its heartbeat says (one
function, `model_state`, so the table and `--json` cannot disagree): "ready v3", "waiting for
weights", "on demand (not loaded)", "refused v4 (serving v3)". A refusal of a version no newer
than the one served is over (a rollback or a later publish fixed it) and is not shown. Each
model gets its recent answer rate and latency percentiles (master/window.py).
"""
from __future__ import annotations

import time


def model_state(info: dict) -> str:
    """One worker's model, in words, from its (validated) heartbeat entry."""
    version, refused = info.get("version"), live_refusal(info)
    if info.get("ready", True):
        return f"refused v{refused['version']} (serving v{version})" if refused else f"ready v{version}"
    tail = f", refused v{refused['version']}" if refused else ""
    if info.get("on_demand"):
        return f"on demand (not loaded){tail}"
    return f"refused v{refused['version']} (nothing to serve)" if refused else "waiting for weights"


def live_refusal(info: dict) -> dict | None:
    """The worker's refusal, unless it serves that version or a newer one now."""
    refused = info.get("refused")
    if not isinstance(refused, dict) or not isinstance(refused.get("version"), int):
        return None
    serving = info.get("version") if info.get("ready", True) else None
    return None if isinstance(serving, int) and serving >= refused["version"] else refused


def _shown_models(models: dict) -> dict:
    """The worker's models as status shows them: each with its `state`, a refusal that is over left out."""
    out = {}
    for name, info in models.items():
        shown = {k: v for k, v in info.items() if k != "refused"}
        refused = live_refusal(info)
        if refused is not None:
            shown["refused"] = dict(refused)
        shown["state"] = model_state(info)
        out[name] = shown
    return out


def model_summary(name: str, workers) -> dict:
    """A model across workers: how many serve it now, and the best thing that can be said."""
    infos = [w.models[name] for w in workers if name in w.models]
    ready = sum(1 for i in infos if i.get("ready", True))
    if ready:
        state = "ready"
    elif any(i.get("on_demand") for i in infos):
        state = "on demand (not loaded)"
    elif any(live_refusal(i) for i in infos):
        state = "refused (nothing to serve)"
    elif infos:
        state = "waiting for weights"
    else:
        state = "no worker"
    return {"state": state, "workers_ready": ready, "workers": len(infos)}


def build_status(broker, now: float) -> dict:
    workers = []
    for w in sorted(broker.workers.values(), key=lambda w: w.name):
        workers.append({
            "name": w.name,
            "id": w.ident.hex(),
            "pid": w.pid,
            "device": w.device,
            "state": w.display_state,
            "models": _shown_models(w.models),
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
    windows = getattr(broker, "windows", None)
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
            **model_summary(name, broker.workers.values()),
            **({"desired_workers": broker.scaling[name].desired} if name in getattr(broker, "scaling", {}) else {}),
            **(windows.summary(name, now) if windows is not None else {"rate_per_s": 0.0, "p50_ms": None,
                                                                       "p99_ms": None}),
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
        "response_cache": broker.responses.stats(),
        "master": master_view(broker, now),
        "workers": workers,
        "models": models,
        "routes": {m: r.to_json() for m, r in broker.routes.items()},
    }


def master_view(broker, now: float) -> dict:
    """This master's place in an active-active set: its role, its route clock, and each peer as
    last heard (a peer silent for 4 sync intervals is shown 'silent')."""
    limit = 4 * broker.cfg.peer_interval
    peers = [{"endpoint": p.endpoint, "epoch": p.epoch, "workers": p.workers,
              "routes_clock": list(p.routes_clock) if p.routes_clock else None,
              "last_heard_s": None if p.last_heard is None else round(now - p.last_heard, 3),
              "state": "up" if p.last_heard is not None and now - p.last_heard <= limit else "silent"}
             for p in broker.peers.values()]
    return {"epoch": broker.epoch, "role": "active", "routes_clock": list(broker.routes_clock), "peers": peers}
