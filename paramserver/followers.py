"""What the workers following this shard say they serve, so a publisher can tell whether any
live worker accepted a version it committed (client/params.py's worker check).

A worker's weight sync puts a `follower` report in the `hello` it sends every few seconds
and right after it built or refused a version: its name and, per model it follows now, the
version it serves, the versions it built (`loaded`) and those it refused. The shard keeps
the latest report per worker, bounded (MAX_FOLLOWERS, the least recently heard go first),
and shows reports heard within FOLLOWER_TTL_S in its `hello` answer. A report is a peer's
word: every field is checked and bounded here; only a worker-role key may send one (with
--keys, under that key's name).
"""
from __future__ import annotations

from ringserve.protocol.messages import ProtocolError
from ringserve.protocol.placement import model_name_problem

FOLLOWER_TTL_S = 15.0  # a report older than this is a worker that left (workers report every ~5 s)
MAX_FOLLOWERS = 1024
MAX_MODELS = 256  # models per report
MAX_LISTED = 16  # versions per list in a report


def _versions(value: object, what: str) -> list[int]:
    if value is None:
        return []
    if (not isinstance(value, list) or len(value) > MAX_LISTED
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ProtocolError(f"follower report: '{what}' must be a list of at most {MAX_LISTED} version numbers")
    return sorted(set(value))


def parse_report(report: object) -> tuple[str, dict[str, dict]]:
    """A worker's report, checked: (name, {model: {"version", "loaded", "refused"}})."""
    if not isinstance(report, dict):
        raise ProtocolError("field 'follower' must be a map")
    name, models = report.get("name"), report.get("models")
    if not isinstance(name, str) or not 1 <= len(name) <= 128 or not name.isprintable():
        raise ProtocolError("follower report: 'name' must be 1..128 printable characters")
    if not isinstance(models, dict) or len(models) > MAX_MODELS:
        raise ProtocolError(f"follower report: 'models' must map at most {MAX_MODELS} model names to their state")
    out = {}
    for model, state in models.items():
        if model_name_problem(model) or not isinstance(state, dict):
            raise ProtocolError("follower report: each model is a model name -> {version, loaded, refused}")
        version = state.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 0):
            raise ProtocolError("follower report: 'version' must be a version number or nil")
        out[model] = {"version": version, "loaded": _versions(state.get("loaded"), "loaded"),
                      "refused": _versions(state.get("refused"), "refused")}
    return name, out


class Followers:
    """The latest report of each worker heard from (bounded); clock passed in."""

    def __init__(self, ttl_s: float = FOLLOWER_TTL_S, limit: int = MAX_FOLLOWERS):
        self.ttl_s, self.limit = ttl_s, limit
        self.reports: dict[str, tuple[float, dict]] = {}  # name -> (monotonic time heard, models)

    def note(self, name: str, models: dict, now: float) -> None:
        self.reports.pop(name, None)  # re-inserted last: dict order is least recently heard first
        self.reports[name] = (now, models)
        while len(self.reports) > self.limit:
            self.reports.pop(next(iter(self.reports)))

    def snapshot(self, now: float) -> dict[str, dict]:
        """{name: {"age_s", "models"}} of the workers heard within the TTL (older ones forgotten)."""
        for name in [n for n, (t, _) in self.reports.items() if now - t > self.ttl_s]:
            del self.reports[name]
        return {n: {"age_s": round(now - t, 3), "models": m} for n, (t, m) in self.reports.items()}
