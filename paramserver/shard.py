"""One parameter-server shard: a ROUTER for commands, a PUB for announcements (Clone pattern).

Commands ([RSP01][msgpack header][tensor frames...]): hello (state snapshot), stage (receive
this shard's pieces of a new version, checksums verified), commit (make it durable and
current), abort, fetch (send a version's pieces), rollback (make an older version current).
Each commit or rollback is announced on the PUB with a sequence number; a heartbeat
announcement repeats the current state every interval, so a subscriber that joined late or
saw a gap asks for a snapshot (hello) instead of trusting what it missed.
With --keys both sockets are CURVE servers and each command is checked against the sender's
role (protocol/security.py's SHARD_COMMAND_ROLES); a refused command gets no answer.
"""
from __future__ import annotations

import errno
import os
import signal
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import structlog
import zmq

from ringserve.paramserver.store import ShardStore, Slice, sha256
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.messages import SHARD_COMMANDS, SHARD_PROTO, ErrorCode, ProtocolError, error_body
from ringserve.protocol.placement import Piece
from ringserve.protocol.security import SHARD_COMMAND_ROLES, Security, user_id

log = structlog.get_logger("ringserve.paramserver")


@dataclass
class ShardConfig:
    name: str
    data_dir: str
    bind: str = "tcp://127.0.0.1:*"
    pub: str = "tcp://127.0.0.1:*"
    keep: int = 3
    announce_interval: float = 1.0
    security: Security = field(default_factory=Security)  # keys, MAXMSGSIZE (protocol/security.py)


class Shard:
    def __init__(self, cfg: ShardConfig, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.ctx = ctx or zmq.Context()
        self.store = ShardStore(cfg.data_dir, cfg.keep)
        self.store.load_all()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.LINGER, 0)
        cfg.security.server(self.router, "shard.cmd")
        self.router.bind(cfg.bind)
        self.pubsock = self.ctx.socket(zmq.PUB)
        self.pubsock.setsockopt(zmq.LINGER, 0)
        cfg.security.server(self.pubsock, "shard.pub")
        self.pubsock.bind(cfg.pub)
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pub_endpoint = self.pubsock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.boot = uuid.uuid4().hex[:12]
        self.seq = 0
        self.staging: dict[tuple[str, int], Slice] = {}
        self.stopping = False
        self.last_announce = 0.0
        self.refused = 0  # commands from a key whose role may not run them (answered with nothing)

    def run(self) -> None:
        log.info("shard_started", shard=self.cfg.name, endpoint=self.endpoint, pub=self.pub_endpoint,
                 versions=self.store.versions())
        try:
            while not self.stopping:
                if self.router.poll(int(self.cfg.announce_interval * 1000 / 2)):
                    frames = self.router.recv_multipart(copy=False)
                    self.on_message(frames)
                now = time.monotonic()
                if now - self.last_announce >= self.cfg.announce_interval:
                    self.last_announce = now
                    self._announce("hugz", "", None)
        finally:
            self.router.close(linger=0)
            self.pubsock.close(linger=0)
            log.info("shard_stopped", shard=self.cfg.name)

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    # ---------------------------------------------------------------- events
    def on_message(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        out: list = []
        rid = None
        try:
            if len(frames) < 3 or frames[1].bytes != SHARD_PROTO:
                raise ProtocolError("expected [RSP01][header][tensor frames...]")
            header = unpack_map(frames[2])
            rid = header.get("rid")
            if header.get("cmd") not in SHARD_COMMANDS:
                raise ProtocolError(f"unknown command {header.get('cmd')!r}; one of {', '.join(SHARD_COMMANDS)}")
            if self.cfg.security.authorize(frames[-1], SHARD_COMMAND_ROLES[header["cmd"]]) is None:
                self.refused += 1  # a refused peer gets nothing and changes nothing
                log.warning("command_refused", cmd=header["cmd"], rid=rid, user=user_id(frames[-1]))
                return
            handler = getattr(self, f"on_{header['cmd']}")
            reply = handler(header, frames[3:])
            if isinstance(reply, tuple):
                reply, out = reply
        except ProtocolError as exc:
            reply = error_body(None, ErrorCode.BAD_REQUEST, str(exc))
        except Exception as exc:  # a failing command must not stop the shard
            log.exception("shard_command_failed")
            reply = error_body(None, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        reply.setdefault("shard", self.cfg.name)
        reply["rid"] = rid
        try:
            self.router.send_multipart([ident, SHARD_PROTO, pack(reply), *out], copy=False)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            log.warning("shard_reply_undeliverable")

    def on_hello(self, header: dict, frames) -> dict:
        return {"ok": True, "name": self.cfg.name, "pub": self.pub_endpoint, "boot": self.boot, "seq": self.seq,
                "current": dict(self.store.current), "versions": self.store.versions(),
                "corrupt": {m: {str(v): why for v, why in c.items()} for m, c in self.store.corrupt.items()}}

    def on_stage(self, header: dict, frames) -> dict:
        model, version, base = _model(header), _version(header), header.get("base")
        items = header.get("pieces")
        if not isinstance(items, list) or len(items) != len(frames):
            raise ProtocolError("stage needs 'pieces' with one frame each")
        sl = Slice(version)
        if base is not None:
            base_slice = self.store.slices.get(model, {}).get(base)
            if base_slice is None:
                return error_body(None, ErrorCode.UNKNOWN_VERSION, f"base version {base} of {model!r} not on shard")
            sl.pieces, sl.data, sl.checksums = dict(base_slice.pieces), dict(base_slice.data), dict(base_slice.checksums)
        for item, frame in zip(items, frames):
            piece, checksum = Piece.from_list(item[:6]), item[6]
            buf = frame.buffer
            if sha256(buf) != checksum:
                raise ProtocolError(f"piece {piece.key}: checksum mismatch in transfer")
            arr = np.frombuffer(buf, dtype=piece.dtype)
            if arr.size != piece.stop - piece.start:
                raise ProtocolError(f"piece {piece.key}: {arr.size} elements, expected {piece.stop - piece.start}")
            sl.pieces[piece.key], sl.data[piece.key], sl.checksums[piece.key] = piece, arr, checksum
        self.staging[(model, version)] = sl
        return {"ok": True, "staged": len(items)}

    def on_commit(self, header: dict, frames) -> dict:
        model, version = _model(header), _version(header)
        if version in self.store.slices.get(model, {}):
            return {"ok": True, "already": True}
        sl = self.staging.pop((model, version), None)
        if sl is None:
            return error_body(None, ErrorCode.UNKNOWN_VERSION, f"nothing staged for {model!r} v{version}")
        self.store.commit(model, sl)
        self._announce("commit", model, version)
        log.info("version_committed", model=model, version=version, pieces=len(sl.pieces))
        return {"ok": True}

    def on_abort(self, header: dict, frames) -> dict:
        self.staging.pop((_model(header), _version(header)), None)
        return {"ok": True}

    def on_fetch(self, header: dict, frames):
        model = _model(header)
        version = header.get("version", self.store.current.get(model))
        why = self.store.corrupt.get(model, {}).get(version)
        if why:
            return error_body(None, ErrorCode.CORRUPT, f"shard {self.cfg.name}: {model} {why}")
        sl = self.store.slices.get(model, {}).get(version)
        if sl is None:
            return error_body(None, ErrorCode.UNKNOWN_VERSION, f"shard {self.cfg.name} has no {model!r} v{version}")
        manifest = [[*sl.pieces[k].as_list(), sl.checksums[k]] for k in sl.pieces]
        if header.get("manifest_only"):  # what the version is made of, so a worker fetches only what changed
            return {"ok": True, "model": model, "version": version, "manifest": manifest}
        wanted = header.get("keys")
        keys = [k for k in sl.pieces if wanted is None or k in set(wanted)]
        return ({"ok": True, "model": model, "version": version,
                 "pieces": [[*sl.pieces[k].as_list(), sl.checksums[k]] for k in keys]},
                [memoryview(sl.data[k]).cast("B") for k in keys])

    def on_rollback(self, header: dict, frames) -> dict:
        model, version = _model(header), _version(header)
        if version not in self.store.slices.get(model, {}):
            return error_body(None, ErrorCode.UNKNOWN_VERSION, f"shard {self.cfg.name} has no {model!r} v{version}")
        self.store.set_current(model, version)
        self._announce("rollback", model, version)
        log.info("version_rolled_back", model=model, version=version)
        return {"ok": True}

    def _announce(self, kind: str, model: str, version: int | None) -> None:
        if kind != "hugz":
            self.seq += 1
        self.pubsock.send_multipart([model.encode(), pack({
            "kind": kind, "shard": self.cfg.name, "boot": self.boot, "seq": self.seq, "model": model,
            "version": version, "current": dict(self.store.current)})])


def _model(header: dict) -> str:
    model = header.get("model")
    if not isinstance(model, str) or not model or "/" in model or model.startswith("."):
        raise ProtocolError("field 'model' must be a plain name")
    return model


def _version(header: dict) -> int:
    v = header.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ProtocolError("field 'version' must be a non-negative integer")
    return v


def serve(cfg: ShardConfig, announce=None) -> None:
    shard = Shard(cfg)
    signal.signal(signal.SIGTERM, shard.request_stop)
    signal.signal(signal.SIGINT, shard.request_stop)
    if announce is not None:
        announce({"role": "paramserver", "pid": os.getpid(), "name": cfg.name, "endpoint": shard.endpoint,
                  "pub": shard.pub_endpoint})
    shard.run()
