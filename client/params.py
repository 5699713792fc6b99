"""Publishing model weights to the parameter servers (two-phase: stage everywhere, then commit).

A version becomes visible only when every shard has committed it: workers switch only when
all shards announce the same current version. If staging fails on any shard, the others
abort and nothing changes; if a commit fails part way, the shards that committed are rolled
back to the previous current version, so the old version keeps serving.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np
import structlog
import zmq
from safetensors.numpy import load_file

from ringserve.protocol.codec import to_numpy
from ringserve.protocol.placement import DEFAULT_CHUNK_BYTES, parse_shards, place, plan
from ringserve.protocol.security import Security
from ringserve.protocol.shardrpc import ShardCallError, ShardRPC

log = structlog.get_logger("ringserve.publish")


class PublishError(RuntimeError):
    pass


class ParamClient:
    def __init__(self, shards: str | Mapping[str, str], chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 timeout: float = 30.0, security: Security | None = None):
        self.shards = parse_shards(shards) if isinstance(shards, str) else dict(shards)
        self.chunk_bytes = chunk_bytes
        self._ctx = zmq.Context()
        self.rpc = ShardRPC(self._ctx, self.shards, timeout, security)  # Security(dir, "publisher") with keys

    def close(self) -> None:
        self.rpc.close()
        self._ctx.term()

    def __enter__(self) -> "ParamClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def hello(self, timeout: float | None = None) -> dict[str, dict]:
        return {n: h for n, (h, _) in self.rpc.call_all({"cmd": "hello"}, timeout).items()}

    def versions(self, model: str) -> dict[str, dict]:
        """Per shard: committed versions and the current one."""
        return {n: {"versions": h["versions"].get(model, []), "current": h["current"].get(model)}
                for n, h in self.hello().items()}

    def publish(self, model: str, tensors: Mapping[str, Any], version: int | None = None,
                base: int | None = None) -> int:
        """Publish a full state dict, or with `base` a delta: only `tensors` change, the rest is base's."""
        try:
            states = self.hello()
        except ShardCallError as exc:
            raise PublishError(f"cannot publish {model!r}: {exc}") from None
        previous = {n: h["current"].get(model) for n, h in states.items()}
        if version is None:
            version = 1 + max([v for h in states.values() for v in h["versions"].get(model, [])], default=0)
        arrays = {name: to_numpy(t) for name, t in tensors.items()}
        pieces = plan({n: (a.dtype.name, a.shape, a.dtype.itemsize) for n, a in arrays.items()}, self.chunk_bytes)
        flat = {n: a.reshape(-1) for n, a in arrays.items()}
        requests = {}
        for shard, mine in place(pieces, self.shards).items():
            frames = [memoryview(np.ascontiguousarray(flat[p.param][p.start:p.stop])).cast("B") for p in mine]
            header = {"cmd": "stage", "model": model, "version": version, "base": base,
                      "pieces": [[*p.as_list(), hashlib.sha256(f).hexdigest()] for p, f in zip(mine, frames)]}
            requests[shard] = (header, frames)
        try:
            self.rpc.call(requests)
        except ShardCallError as exc:
            self.rpc.call_all({"cmd": "abort", "model": model, "version": version}, timeout=2, raise_on_error=False)
            raise PublishError(f"publish of {model!r} v{version} failed while staging, nothing changed: {exc}") from None
        replies = self.rpc.call_all({"cmd": "commit", "model": model, "version": version}, raise_on_error=False)
        failed = {n for n in self.shards if n not in replies or not replies[n][0].get("ok")}
        if failed:
            for n in set(self.shards) - failed:
                if previous.get(n) is not None:
                    self.rpc.call({n: ({"cmd": "rollback", "model": model, "version": previous[n]}, [])},
                                  timeout=2, raise_on_error=False)
            raise PublishError(f"publish of {model!r} v{version} failed to commit on {sorted(failed)}; "
                               f"the previous version stays current")
        log.info("published", model=model, version=version, base=base, tensors=len(arrays), pieces=len(pieces))
        return version

    def publish_file(self, model: str, path: str, version: int | None = None, base: int | None = None) -> int:
        return self.publish(model, load_file(path), version, base)

    def rollback(self, model: str, version: int) -> None:
        """Make an earlier committed version current on every shard; workers swap back."""
        try:
            self.rpc.call_all({"cmd": "rollback", "model": model, "version": version})
        except ShardCallError as exc:
            raise PublishError(f"rollback of {model!r} to v{version} failed: {exc}") from None


def changed_tensors(new: Mapping[str, Any], old: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The tensors of `new` that differ from `old`: what a delta publish needs to send."""
    out = {}
    for name, value in new.items():
        a = to_numpy(value)
        if name not in old or not np.array_equal(a, to_numpy(old[name])):
            out[name] = a
    return out
