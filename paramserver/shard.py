"""One parameter-server shard: a ROUTER for commands, a PUB for announcements (Clone pattern).

Commands ([RSP01][msgpack header][tensor frames...]): hello (state snapshot; a worker's hello
also reports what it serves: paramserver/followers.py; a publisher's may ask for a committed
version's layout, `layout_of`, which it checks a new version against), stage (receive
this shard's pieces of a new version, checksums verified, pieces not stored yet written to
disk, invisible), commit (write its manifest: durable and current), abort, revert (undo a
commit of a publish that failed elsewhere), fetch (send a version's manifest, or its pieces
or some of them: workers keep several fetches in flight; with `stage` and `digest`, a staged
version's), rollback (make an older version current). Storage is content-addressed
(paramserver/store.py): a delta writes only its changed pieces.

A stage's piece files are written (and, with the default `durability="fsync"`, fsynced) on a
writer thread while this loop serves; the stage is answered only once they are on disk, so a
publisher never commits what a crash could lose. Meanwhile the checked stage is announced
("staged": model, version, token, digest) and may be fetched, so workers move its bytes while
the disk works, and serve it only once it commits (issue 22; worker/sync.py). With
`durability="replicated"` the files are not fsynced (manifests still are): a commit then
relies on its W copies: a piece torn by a power loss fails its checksum at start, the shard
falls back as for any corrupt version, and repair copies it back from the other owners.
Each stage, commit (with its digest) or rollback is announced on the PUB with a sequence number; a heartbeat
announcement repeats the current state every interval, so a subscriber that joined late or
saw a gap asks for a snapshot (hello) instead of trusting what it missed.

Staging is keyed by (model, version, publisher token), so two publishers never blend; a
version number that is already committed with other content is answered CONFLICT. A delta is
merged by parameter name (the base's pieces of a parameter the delta carries are all
replaced) and checked against the base. Staging is bounded in bytes and age. Replies are
sent without blocking: a peer that does not read them loses them, the shard keeps serving.

Replication (issue 20): a shard started with the shard list (`shards`) and R (`replicas`)
reports both in its hello (R and the ring's fingerprint, so a role with another list or R gets
a clear error at connect) and runs paramserver/repair.py on a thread: versions it lacks are
copied from the other owners and handed to this loop (`apply`) to be stored, and a newer
current version (by epoch: each commit, rollback and revert carries the publisher's stamp)
is adopted. Without the shard list it stores what it is sent and repairs nothing.

With --keys both sockets are CURVE servers and each command is checked against the sender's
role (protocol/security.py's SHARD_COMMAND_ROLES); a refused command gets no answer.
"""
from __future__ import annotations

import errno
import os
import queue
import signal
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import structlog
import zmq

from ringserve.paramserver.followers import Followers, parse_report
from ringserve.paramserver.metrics import ShardMetrics
from ringserve.paramserver.repair import FULL_CHECK_S, Repairer
from ringserve.paramserver.store import ShardStore, Slice, is_checksum
from ringserve.protocol.digest import CHECKSUM_FORMS, checksum_matches
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.messages import SHARD_COMMANDS, SHARD_PROTO, ErrorCode, ProtocolError, error_body
from ringserve.protocol.placement import Piece, dtype_problem, fingerprint, model_name_problem, resolve_replicas
from ringserve.protocol.security import Security, shard_command_roles, user_id
from ringserve.protocol.sockets import BindError, bind

log = structlog.get_logger("ringserve.paramserver")


@dataclass
class ShardConfig:
    name: str
    data_dir: str
    bind: str = "tcp://127.0.0.1:*"
    pub: str = "tcp://127.0.0.1:*"
    keep: int = 3
    announce_interval: float = 1.0
    max_staging_bytes: int = 2 * 1024 ** 3  # all stages together; beyond it a stage is refused OVERLOADED
    staging_ttl: float = 600.0  # seconds a stage may wait for its commit before it is dropped
    hwm: int = 1000  # messages queued per peer; beyond it replies to that peer are dropped
    security: Security = field(default_factory=Security)  # keys, MAXMSGSIZE (protocol/security.py)
    shards: dict | None = None  # the ring's shard list {name: endpoint}: enables the checks and repair
    replicas: int | None = None  # R; None: the default for the shard list (unknown without one)
    repair_interval: float = 2.0  # seconds between anti-entropy rounds (0: no repair)
    repair_bytes_per_s: float = 0.0  # repair traffic at most this (0: unbounded)
    full_check_interval: float = FULL_CHECK_S  # seconds between repair's full comparisons (rebalance)
    durability: str = "fsync"  # "fsync": a stage is answered once its pieces are fsynced; "replicated": once
    # they are written (page cache), the W-of-R copies being what a commit relies on (docs/operations.md)


DURABILITY = ("fsync", "replicated")


MAX_NAME = 512  # longest tensor name accepted (safetensors header names)
PRUNE_WITHIN_S = 2.0  # a commit's prune waits for an idle moment at most this long


@dataclass
class Stage:
    """One publisher's staged pieces of one version, invisible until committed."""

    slice: Slice
    token: str
    created: float
    nbytes: int  # bytes received for this stage (pieces shared with the base are not counted)
    written: dict = field(default_factory=dict)  # pieces and bytes written to disk on arrival (and the staged manifest)
    tag: str = ""  # names this stage's temporary files (its staged manifest until the commit renames it)
    writing: Future | None = None  # the writer thread's job while its pieces go to disk (no commit before)


@dataclass
class PendingReply:
    """A stage answered once its pieces are on disk (the writer thread's job is done)."""

    ident: bytes
    rid: object
    started: float
    key: tuple[str, int, str]
    stage: Stage
    todo: dict
    reply: dict
    check_s: float


class Shard:
    def __init__(self, cfg: ShardConfig, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.ctx = ctx or zmq.Context()
        if cfg.durability not in DURABILITY:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY)}, not {cfg.durability!r}")
        self.store = ShardStore(cfg.data_dir, cfg.keep, fsync=cfg.durability == "fsync")
        self.store.load_all()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, cfg.hwm)
        self.router.setsockopt(zmq.SNDTIMEO, 0)
        cfg.security.server(self.router, "shard.cmd")
        self.pubsock = self.ctx.socket(zmq.PUB)
        self.pubsock.setsockopt(zmq.LINGER, 0)
        cfg.security.server(self.pubsock, "shard.pub")
        try:
            self.endpoint = bind(self.router, cfg.bind)
            self.pub_endpoint = bind(self.pubsock, cfg.pub)
        except BindError:
            self.router.close(linger=0)
            self.pubsock.close(linger=0)
            raise
        self.boot = uuid.uuid4().hex[:12]
        self.seq = 0
        self.staging: dict[tuple[str, int, str], Stage] = {}  # (model, version, token) -> stage
        self.store.pinned = self._staged_checksums  # pieces a stage wrote survive a collect until it ends
        self.store.pinned_tags = lambda model: {st.tag for (m, _, _), st in self.staging.items() if m == model}
        self.replies_dropped = 0
        self.stopping = False
        self.last_announce = 0.0
        self.metrics = ShardMetrics(cfg.name)
        self.refused = 0  # commands from a key whose role may not run them (answered with nothing)
        self.fetch_bytes = 0  # weight bytes sent in fetch replies since start
        self.followers = Followers()  # what the workers following us serve (for the publisher's check)
        self.replicas = (resolve_replicas(cfg.replicas, len(cfg.shards)) if cfg.shards
                         else cfg.replicas)  # None: not told (the roles' check is skipped)
        if cfg.shards and cfg.name not in cfg.shards:
            raise ValueError(f"shard {cfg.name!r} is not in its own --shards list ({', '.join(sorted(cfg.shards))})")
        self.ring_fp = fingerprint(cfg.shards, self.replicas) if cfg.shards else None
        self.prune_due: dict[str, float] = {}  # model -> when a commit left it to prune
        self.apply: queue.Queue = queue.Queue(maxsize=64)  # what repair copied, stored by this loop
        # Stages' piece files are written (and fsynced) on one thread while this loop serves: the
        # workers fetch a staged version (announced "staged") while its pieces go to disk; the
        # stage is answered, and may be committed, only once they are there.
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="ringserve-stage-writer")
        self.pending: list[PendingReply] = []
        self._wake_r, self._wake_w = os.pipe()  # the writer says "done" here: the loop's poller hears it
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self._wake_r, zmq.POLLIN)
        self.repairer = None
        if cfg.shards and len(cfg.shards) > 1 and cfg.repair_interval > 0:
            self.repairer = Repairer(cfg.name, cfg.shards, self.replicas, cfg.keep, self.apply,
                                     cfg.repair_interval, cfg.repair_bytes_per_s, security=cfg.security,
                                     full_check_s=cfg.full_check_interval)

    def run(self) -> None:
        log.info("shard_started", shard=self.cfg.name, endpoint=self.endpoint, pub=self.pub_endpoint,
                 versions=self.store.versions())
        if self.repairer is not None:
            self.repairer.start()
        try:
            while not self.stopping:
                ready = dict(self.poller.poll(int(min(self.cfg.announce_interval * 1000 / 2, 200))))
                if self._wake_r in ready:
                    self._drain_wake()
                if self.pending:
                    self._finish_writes()
                if self.router in ready:
                    for _ in range(16):  # bounded per turn: the writer's answers and the timers come round
                        try:
                            frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.on_message(frames)
                    self._prune_due(idle=False)
                elif not self.pending:
                    self._prune_due(idle=True)
                self._apply_repairs()
                now = time.monotonic()
                self.expire_staging(now)
                if now - self.last_announce >= self.cfg.announce_interval:
                    self.last_announce = now
                    self._announce("hugz", "", None)
                    self._refresh_metrics()
        finally:
            if self.repairer is not None:
                self.repairer.stopping.set()
                self.repairer.join(timeout=5)
            self.writer.shutdown(wait=True, cancel_futures=True)  # a write in progress ends; .tmp files go at start
            self.store.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self.router.close(linger=0)
            self.pubsock.close(linger=0)
            log.info("shard_stopped", shard=self.cfg.name)

    def _prune_due(self, idle: bool) -> None:
        """Prune the models committed lately: when no command waits (the workers' fetches of the
        new version come first), or at the latest PRUNE_WITHIN_S after the commit."""
        now = time.monotonic()
        for model, since in list(self.prune_due.items()):
            if idle or now - since >= PRUNE_WITHIN_S:
                del self.prune_due[model]
                t0 = time.monotonic()
                try:
                    gone = self.store.prune(model)
                    log.info("version_pruned", model=model, pieces=gone, idle=idle,
                             waited_s=round(t0 - since, 3), took_s=round(time.monotonic() - t0, 4))
                except Exception:  # noqa: BLE001 - a file that cannot be deleted never stops the shard
                    log.exception("prune_failed", model=model)

    def _apply_repairs(self) -> None:
        """Store what the repair thread copied (bounded per turn), on this thread: the store is ours."""
        for _ in range(8):
            try:
                item = self.apply.get_nowait()
            except queue.Empty:
                return
            try:
                if item[0] in ("install", "merge"):  # what a peer sent is checked as a stage is
                    for k, p in item[-1].pieces.items():
                        _piece([*p.as_list(), item[-1].checksums[k]])
                if item[0] == "install":
                    _, model, sl = item
                    if sl.version not in self.store.slices.get(model, {}):
                        self.store.install(model, sl)
                        self.metrics.on_repair(len(sl.pieces), sl.nbytes())
                        log.info("version_installed_by_repair", model=model, version=sl.version,
                                 pieces=len(sl.pieces))
                elif item[0] in ("merge", "drop"):
                    model, version = item[1], (item[2].version if item[0] == "merge" else item[2])
                    changed = self.store.reshape(model, version, add=item[2] if item[0] == "merge" else None,
                                                 drop=item[3] if item[0] == "drop" else ())
                    if changed and item[0] == "merge":
                        self.metrics.on_repair(changed, item[2].nbytes())
                    log.info("version_reshaped_by_repair", model=model, version=version, how=item[0], pieces=changed)
                elif item[0] == "current":
                    _, model, version, epoch = item
                    if (version in self.store.slices.get(model, {})
                            and epoch > self.store.epochs.get(model, 0) and self.store.current.get(model) != version):
                        self.store.set_current(model, version, epoch=epoch)
                        self.store.collect(model)
                        self._announce("rollback", model, version)
                        log.info("current_adopted_by_repair", model=model, version=version, epoch=epoch)
            except ProtocolError as exc:
                log.warning("repair_refused", error=str(exc)[:300])
            except Exception:  # noqa: BLE001 - a repair that cannot be stored is tried again next round
                log.exception("repair_apply_failed")

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    # ---------------------------------------------------------------- events
    def on_message(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        out: list = []
        rid = cmd = None
        started = time.monotonic()
        try:
            if len(frames) < 3 or frames[1].bytes != SHARD_PROTO:
                raise ProtocolError("expected [RSP01][header][tensor frames...]")
            header = unpack_map(frames[2])
            rid = header.get("rid")
            if header.get("cmd") not in SHARD_COMMANDS:
                raise ProtocolError(f"unknown command {header.get('cmd')!r}; one of {', '.join(SHARD_COMMANDS)}")
            cmd = header["cmd"]
            if self.cfg.security.authorize(frames[-1], shard_command_roles(header)) is None:
                self.refused += 1  # a refused peer gets nothing and changes nothing
                log.warning("command_refused", cmd=cmd, rid=rid, user=user_id(frames[-1]))
                return
            if cmd == "hello" and header.get("follower") is not None:
                try:
                    self._note_follower(header["follower"], frames[-1])
                except ProtocolError as exc:  # a bad report is dropped; the snapshot is still answered
                    log.warning("follower_report_refused", rid=rid, error=str(exc)[:300])
            handler = getattr(self, f"on_{cmd}")
            reply = handler(header, frames[3:]) if cmd != "stage" else self.on_stage(header, frames[3:], ident, started)
            if reply is None:  # a stage answered when its pieces are on disk (_finish_writes)
                return
            if isinstance(reply, tuple):
                reply, out = reply
        except ProtocolError as exc:
            reply = error_body(None, ErrorCode.BAD_REQUEST, str(exc))
        except Exception as exc:  # a failing command must not stop the shard
            log.exception("shard_command_failed")
            reply = error_body(None, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        self._reply(ident, rid, cmd, started, reply, out)

    def _reply(self, ident: bytes, rid, cmd: str | None, started: float, reply: dict, out: list = ()) -> None:
        reply.setdefault("shard", self.cfg.name)
        reply["rid"] = rid
        self.metrics.on_command(cmd or "invalid", "ok" if reply.get("ok") else reply.get("error", {}).get("code", "?"),
                                time.monotonic() - started)
        if out:
            sent = sum(memoryview(f).nbytes for f in out)
            self.metrics.on_fetch(sent)
            self.fetch_bytes += sent
        try:  # never block: a peer that does not read its replies loses them, nobody else waits
            self.router.send_multipart([ident, SHARD_PROTO, pack(reply), *out], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            self.replies_dropped += 1
            log.warning("shard_reply_undeliverable", rid=rid, dropped=self.replies_dropped,
                        why="peer gone" if exc.errno == errno.EHOSTUNREACH else "peer not reading (high-water mark)")

    def _note_follower(self, report: object, last_frame) -> None:
        """A worker's report of what it serves (paramserver/followers.py). Only a worker may send
        one; with keys it is filed under the key's name, not the name it announces."""
        if self.cfg.security.authorize(last_frame, frozenset({"worker"})) is None:
            raise ProtocolError("only a worker may send a follower report")
        name, models = parse_report(report)
        user = user_id(last_frame) if self.cfg.security.enabled else None
        if user:
            name = user.split(":")[1] if user.count(":") >= 1 else user
        self.followers.note(name, models, time.monotonic())

    def on_hello(self, header: dict, frames) -> dict:
        reply = self._hello()
        if header.get("layout_of") is not None:  # a publisher's: what it checks a new version against
            reply["layout_of"] = self._layout_of(header["layout_of"])
        return reply

    def _layout_of(self, ask: object) -> dict:
        """The layout ({tensor: [dtype, shape]}) of the committed version a publisher's hello asks
        for (`version` None: the current one), so the publisher needs no manifest round trip
        before it stages; `layout` None when this shard holds no readable copy of it."""
        if not isinstance(ask, dict):
            raise ProtocolError("field 'layout_of' must be a map {model, version}")
        model, version = _model(ask), ask.get("version")
        if version is None:
            version = self.store.current.get(model)
        elif not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ProtocolError("field 'layout_of.version' must be a non-negative integer or nil")
        sl = self.store.slices.get(model, {}).get(version) if version is not None else None
        if sl is None or self.store.corrupt.get(model, {}).get(version):
            return {"model": model, "version": version, "layout": None}
        return {"model": model, "version": version,
                "layout": {p.param: [p.dtype, list(p.shape)] for p in sl.pieces.values()}}

    def _hello(self) -> dict:
        return {"ok": True, "name": self.cfg.name, "pub": self.pub_endpoint, "boot": self.boot, "seq": self.seq,
                "current": dict(self.store.current), "versions": self.store.versions(),
                "history": {m: list(h) for m, h in self.store.history.items() if h},
                "followers": self.followers.snapshot(time.monotonic()),
                "corrupt": {m: {str(v): why for v, why in c.items()} for m, c in self.store.corrupt.items()},
                "fallback": dict(self.store.fallback), "announce_interval": self.cfg.announce_interval,
                "staging": {"stages": len(self.staging), "bytes": self.staging_bytes(),
                            "max_bytes": self.cfg.max_staging_bytes, "ttl_s": self.cfg.staging_ttl},
                "replies_dropped": self.replies_dropped, "fetch_bytes": self.fetch_bytes,
                "replicas": self.replicas, "ring": self.ring_fp, "epochs": dict(self.store.epochs),
                "repair": dict(self.repairer.status) if self.repairer is not None else None,
                "store": {"written": dict(self.store.written), "last_commit": dict(self.store.last_commit),
                          "pieces": {m: len(c) for m, c in self.store.stored.items()}}}

    # --------------------------------------------------------------- staging
    def _staged_checksums(self, model: str) -> set[str]:
        return {c for (m, _, _), st in self.staging.items() if m == model for c in st.slice.checksums.values()}

    def staging_bytes(self) -> int:
        return sum(st.nbytes for st in self.staging.values())

    def expire_staging(self, now: float) -> None:
        for key, st in list(self.staging.items()):
            if now - st.created > self.cfg.staging_ttl:
                del self.staging[key]
                self.store.collect(key[0])
                self._announce("unstaged", key[0], key[1], token=key[2])  # a worker drops what it prefetched
                log.warning("stage_expired", model=key[0], version=key[1], token=key[2], bytes=st.nbytes,
                            age_s=round(now - st.created, 1))

    def on_stage(self, header: dict, frames, ident: bytes = b"", started: float = 0.0) -> dict | None:
        """Check a stage's pieces, announce it ("staged": workers may fetch it now, and serve it
        once it commits), and hand its piece files to the writer thread; the stage is answered
        when they are on disk (None here: `_finish_writes` answers)."""
        model, version, token, digest = _model(header), _version(header), _token(header), _digest(header)
        base = header.get("base")
        if base is not None and (not isinstance(base, int) or isinstance(base, bool)):
            raise ProtocolError("field 'base' must be a version number")
        items = header.get("pieces")
        if not isinstance(items, list) or len(items) != len(frames):
            raise ProtocolError("stage needs 'pieces' with one frame each")
        replace = _replace(header)
        committed = self.store.slices.get(model, {}).get(version)
        if committed is not None and committed.digest != digest:
            return _conflict(model, version)
        nbytes = sum(len(f.buffer) for f in frames)
        self.expire_staging(time.monotonic())
        held = self.staging_bytes() - (self.staging[(model, version, token)].nbytes
                                       if (model, version, token) in self.staging else 0)
        if held + nbytes > self.cfg.max_staging_bytes:
            return error_body(None, ErrorCode.OVERLOADED, f"staging area full ({held} of "
                                                          f"{self.cfg.max_staging_bytes} bytes held); retry later")
        sl = Slice(version, digest=digest)
        base_slice = None
        if base is not None:
            base_slice = self.store.slices.get(model, {}).get(base)
            if base_slice is None:
                return error_body(None, ErrorCode.UNKNOWN_VERSION, f"base version {base} of {model!r} not on shard")
            gone = set(replace)  # merge by parameter: every base piece of a carried parameter is replaced
            for k, p in base_slice.pieces.items():
                if p.param not in gone:
                    sl.pieces[k], sl.data[k], sl.checksums[k] = p, base_slice.data[k], base_slice.checksums[k]
        layouts: dict[str, tuple[str, tuple]] = {}
        t0 = time.monotonic()
        for item, frame in zip(items, frames, strict=True):  # as many as checked above
            piece, checksum = _piece(item)
            if base is not None and piece.param not in replace:
                raise ProtocolError(f"piece {piece.key}: parameter {piece.param!r} not listed in 'replace'")
            if layouts.setdefault(piece.param, (piece.dtype, piece.shape)) != (piece.dtype, piece.shape):
                raise ProtocolError(f"piece {piece.key}: pieces of {piece.param!r} disagree on shape or dtype")
            buf = frame.buffer
            if not checksum_matches(buf, checksum):  # the one check of these bytes here: fetches serve them as they are
                raise ProtocolError(f"piece {piece.key}: checksum mismatch in transfer")
            if len(buf) % np.dtype(piece.dtype).itemsize:
                raise ProtocolError(f"piece {piece.key}: {len(buf)} bytes is not a whole number of {piece.dtype}")
            arr = np.frombuffer(buf, dtype=piece.dtype)
            if arr.size != piece.stop - piece.start:
                raise ProtocolError(f"piece {piece.key}: {arr.size} elements, expected {piece.stop - piece.start}")
            if piece.key in sl.pieces and sl.pieces[piece.key].param != piece.param:
                raise ProtocolError(f"piece {piece.key}: key already names a piece of another parameter")
            sl.pieces[piece.key], sl.data[piece.key], sl.checksums[piece.key] = piece, arr, checksum
        if base_slice is not None:
            problem = delta_problem(base_slice, replace)
            if problem:
                return error_body(None, ErrorCode.BAD_REQUEST, f"delta on v{base} of {model!r}: {problem}")
        key = (model, version, token)
        replaced = self.staging.pop(key, None)
        t1 = time.monotonic()
        stage = Stage(sl, token, time.monotonic(), nbytes, tag=uuid.uuid4().hex[:8])
        self.staging[key] = stage
        if replaced is not None:
            self.store.collect(model)  # what only the replaced stage wrote
        todo = self.store.unstored(model, sl)
        # the files get a name of this stage's own until renamed: another stage of the same content may be writing too
        stage.writing = self.writer.submit(self._write_stage, model, todo, stage.tag, sl)
        stage.writing.add_done_callback(self._wake)  # once the result is set: the loop's done() then holds
        self.pending.append(PendingReply(ident, header.get("rid"), started or t0, key, stage, todo,
                                         {"ok": True, "staged": len(items), "layout": layout(sl)}, t1 - t0))
        self._announce("staged", model, version, token=token, digest=digest)  # its pieces are checked: fetchable
        return None

    def _write_stage(self, model: str, todo: dict, tag: str, sl: Slice) -> dict:
        """On the writer thread: the stage's new piece files, durable, and its manifest under a
        temporary name (fsynced), so the commit only renames it. The loop is woken by `_wake`,
        the future's done callback: woken from in here, before the future held its result, the
        loop found the write not done and slept a poll timeout more (up to 200 ms) before it
        answered the stage (sixth round)."""
        began = time.monotonic()
        done = self.store.write_stage(model, todo, tag, sl)  # pieces and manifest, one pass
        done["began"] = began
        return done

    def _wake(self, _future: Future | None = None) -> None:
        """Wake the loop's poller (the writer's job is done)."""
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):  # the pipe is full (the loop wakes anyway) or closed at stop
            pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _finish_writes(self) -> None:
        """Answer the stages whose piece files the writer thread has made durable (or failed to)."""
        done = [p for p in self.pending if p.stage.writing.done()]
        if not done:
            return
        self.pending = [p for p in self.pending if not p.stage.writing.done()]
        for p in done:
            model, version, token = p.key
            try:
                written = p.stage.writing.result()
            except Exception as exc:  # noqa: BLE001 - a full disk, say: this stage fails, the shard serves on
                log.error("stage_write_failed", model=model, version=version, error=f"{type(exc).__name__}: {exc}")
                if self.staging.get(p.key) is p.stage:
                    del self.staging[p.key]
                    self._announce("unstaged", model, version, token=token)
                self.store.collect(model)
                self._reply(p.ident, p.rid, "stage", p.started,
                            error_body(None, ErrorCode.INTERNAL, f"writing the staged pieces failed: "
                                                                 f"{type(exc).__name__}: {exc}"))
                continue
            self.store.note_written(model, p.todo)
            p.stage.written, p.stage.writing = written, None
            now = time.monotonic()  # queued_s: received -> the writer began; durable_s: received -> this answer
            log.info("version_staged", model=model, version=version, pieces=p.reply["staged"], bytes=p.stage.nbytes,
                     check_s=round(p.check_s, 4), write_s=written.get("write_s"), fsync_s=written.get("fsync_s"),
                     manifest_s=written.get("manifest_s"), queued_s=round(written.get("began", now) - p.started, 4),
                     durable_s=round(now - p.started, 4), durability=self.cfg.durability)
            if self.staging.get(p.key) is not p.stage:  # aborted, expired or replaced while it was written
                self.store.collect(model)
                self._reply(p.ident, p.rid, "stage", p.started,
                            error_body(None, ErrorCode.UNKNOWN_VERSION, f"the stage of {model!r} v{version} was "
                                                                        f"dropped while its pieces were written"))
                continue
            self._reply(p.ident, p.rid, "stage", p.started, p.reply)

    def on_commit(self, header: dict, frames) -> dict:
        model, version, token, digest = _model(header), _version(header), _token(header), _digest(header)
        stage = self.staging.get((model, version, token))
        committed = self.store.slices.get(model, {}).get(version)
        if committed is not None:
            self.staging.pop((model, version, token), None)
            if committed.digest == digest:
                return {"ok": True, "already": True}  # the same content again (a retried commit)
            return _conflict(model, version)
        if stage is None:
            return error_body(None, ErrorCode.UNKNOWN_VERSION, f"nothing staged for {model!r} v{version} "
                                                               f"by this publisher (expired or aborted?)")
        if stage.slice.digest != digest:
            del self.staging[(model, version, token)]
            raise ProtocolError("commit 'digest' differs from the staged one")
        if stage.writing is not None:  # a publisher commits after the stage's answer; this one did not wait
            return error_body(None, ErrorCode.OVERLOADED, f"{model!r} v{version}: the staged pieces are still "
                                                          f"being written; commit after the stage is answered")
        del self.staging[(model, version, token)]
        t0 = time.monotonic()
        wrote = self.store.commit(model, stage.slice, stage.written, epoch=_epoch(header), prune=False)
        commit_s = time.monotonic() - t0
        self.prune_due.setdefault(model, time.monotonic())  # after the answer and the announcement
        self._announce("commit", model, version, digest=digest)  # a worker that fetched the stage knows it
        log.info("version_committed", model=model, version=version, pieces=len(stage.slice.pieces), token=token,
                 pieces_written=wrote["pieces"], bytes_written=wrote["bytes"], commit_s=round(commit_s, 4))
        return {"ok": True}

    def on_abort(self, header: dict, frames) -> dict:
        model = _model(header)
        version, token = _version(header), _token(header)
        if self.staging.pop((model, version, token), None) is not None:
            self.store.collect(model)  # its pieces, written on arrival, are not kept
            self._announce("unstaged", model, version, token=token)  # a worker drops what it prefetched
        return {"ok": True}

    def on_revert(self, header: dict, frames) -> dict:
        """Undo this publisher's commit of `version` (it failed elsewhere): `previous` is current
        again and the version is forgotten. Only a version with this publish's digest is touched."""
        model, version, token, digest = _model(header), _version(header), _token(header), _digest(header)
        previous = header.get("previous")
        if previous is not None and (not isinstance(previous, int) or isinstance(previous, bool)):
            raise ProtocolError("field 'previous' must be a version number or nil")
        self.staging.pop((model, version, token), None)  # a commit arriving later finds nothing staged
        committed = self.store.slices.get(model, {}).get(version)
        if committed is None or committed.digest != digest:
            return {"ok": True, "reverted": False, "current": self.store.current.get(model)}
        if previous is not None and previous not in self.store.slices.get(model, {}):
            previous = None
        was_current = self.store.current.get(model) == version
        self.store.revert(model, version, previous, epoch=_epoch(header))
        if was_current:
            self._announce("rollback", model, previous)
        log.warning("version_reverted", model=model, version=version, current=self.store.current.get(model))
        return {"ok": True, "reverted": True, "current": self.store.current.get(model)}

    def on_fetch(self, header: dict, frames):
        model = _model(header)
        version = header.get("version", self.store.current.get(model))
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise ProtocolError("field 'version' must be a version number")
        wanted = header.get("keys")
        if wanted is not None and (not isinstance(wanted, list) or not all(isinstance(k, str) for k in wanted)):
            raise ProtocolError("field 'keys' must be a list of piece keys")
        why = self.store.corrupt.get(model, {}).get(version)
        if why:
            return error_body(None, ErrorCode.CORRUPT, f"shard {self.cfg.name}: {model} {why}")
        sl = self.store.slices.get(model, {}).get(version)
        if header.get("stage") is not None:  # a staged version (announced "staged"): fetched before its commit
            sl = self._staged_slice(model, version, header)
        if sl is None:
            return error_body(None, ErrorCode.UNKNOWN_VERSION, f"shard {self.cfg.name} has no {model!r} v{version}")
        if header.get("manifest_only"):  # what the version is made of, so a worker fetches only what changed
            return {"ok": True, "model": model, "version": version, "digest": sl.digest,
                    "manifest": [[*sl.pieces[k].as_list(), sl.checksums[k]] for k in sl.pieces]}
        wanted_set = None if wanted is None else set(wanted)
        keys = [k for k in sl.pieces if wanted_set is None or k in wanted_set]
        return ({"ok": True, "model": model, "version": version,
                 "pieces": [[*sl.pieces[k].as_list(), sl.checksums[k]] for k in keys]},
                [memoryview(sl.data[k]).cast("B") for k in keys])

    def _staged_slice(self, model: str, version, header: dict) -> Slice | None:
        """What a fetch naming a stage (`stage`: the publisher's token, `digest`: its content) reads:
        the stage's checked pieces, or the committed version once that stage has committed."""
        token, digest = _token({"token": header.get("stage")}), _digest(header)
        if not isinstance(version, int) or isinstance(version, bool):
            raise ProtocolError("a fetch of a stage names its version")
        stage = self.staging.get((model, version, token))
        sl = stage.slice if stage is not None else self.store.slices.get(model, {}).get(version)
        return sl if sl is not None and sl.digest == digest else None

    def on_rollback(self, header: dict, frames) -> dict:
        model, version = _model(header), _version(header)
        if version not in self.store.slices.get(model, {}):
            return error_body(None, ErrorCode.UNKNOWN_VERSION, f"shard {self.cfg.name} has no {model!r} v{version}")
        self.store.set_current(model, version, epoch=_epoch(header))
        self.store.collect(model)
        self._announce("rollback", model, version)
        log.info("version_rolled_back", model=model, version=version)
        return {"ok": True}

    def _refresh_metrics(self) -> None:
        slices = self.store.slices
        unique = {(m, sl.checksums[k]): a.nbytes for m, by_v in slices.items() for sl in by_v.values()
                  for k, a in sl.data.items()}  # a piece several versions share is stored once
        self.metrics.refresh({m: len(v) for m, v in slices.items()}, dict(self.store.current), sum(unique.values()))
        if self.repairer is not None:
            self.metrics.under_replicated.set(self.repairer.status.get("under_replicated_versions", 0))

    def _announce(self, kind: str, model: str, version: int | None, **extra) -> None:
        if kind != "hugz":
            self.seq += 1
        self.pubsock.send_multipart([model.encode(), pack({
            "kind": kind, "shard": self.cfg.name, "boot": self.boot, "seq": self.seq, "model": model,
            "version": version, "current": dict(self.store.current), **extra})])


def _model(header: dict) -> str:
    model = header.get("model")
    problem = model_name_problem(model)
    if problem:
        raise ProtocolError(f"field 'model': {problem}")
    return model


def _conflict(model: str, version: int) -> dict:
    return error_body(None, ErrorCode.CONFLICT, f"{model!r} v{version} is already committed with other content "
                                                f"(or by a ringserve-publish of an earlier release, whose "
                                                f"checksums were sha256); publish a new version number")


def _epoch(header: dict) -> int | None:
    """The publisher's stamp of a commit, rollback or revert (None when it sent none)."""
    e = header.get("epoch")
    if e is None:
        return None
    if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < 2 ** 63:
        raise ProtocolError("field 'epoch' must be a non-negative integer (nanoseconds)")
    return e


def _token(header: dict) -> str:
    t = header.get("token")
    if not isinstance(t, str) or not 1 <= len(t) <= 64:
        raise ProtocolError("field 'token' must be the publisher's id (1..64 chars)")
    return t


def _digest(header: dict) -> str:
    d = header.get("digest")
    if not isinstance(d, str) or not 1 <= len(d) <= 128:
        raise ProtocolError("field 'digest' must be the version's content digest")
    return d


def valid_name(name: object) -> bool:
    """A tensor name the store can hold (safetensors reserves __metadata__)."""
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME and name != "__metadata__"
            and name.isprintable() and "#" not in name)


def _piece(item: object) -> tuple[Piece, str]:
    """Validate one [key, param, dtype, shape, start, stop, checksum] entry."""
    if not isinstance(item, list) or len(item) != 7:
        raise ProtocolError("a piece is [key, param, dtype, shape, start, stop, checksum]")
    key, param, dtype, shape, start, stop, checksum = item
    if not valid_name(param):
        raise ProtocolError(f"tensor name {str(param)[:80]!r} cannot be stored (empty, too long, '#', "
                            f"unprintable or reserved __metadata__)")
    if not isinstance(key, str) or not (key == param or (key.startswith(param + "#")
                                                          and key[len(param) + 1:].isdigit())):
        raise ProtocolError(f"piece key {str(key)[:80]!r} must be {param!r} or {param!r}#N")
    if dtype_problem(dtype):
        raise ProtocolError(f"piece {key}: {dtype_problem(dtype)}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ProtocolError(f"piece {key}: shape must be a list of at most 8 non-negative ints")
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (start, stop))
    if not ints or not 0 <= start <= stop <= numel:
        raise ProtocolError(f"piece {key}: range [{start}, {stop}) outside the {numel} elements")
    if not is_checksum(checksum):
        raise ProtocolError(f"piece {key}: checksum must be {CHECKSUM_FORMS}")
    return Piece(key, param, dtype, tuple(shape), start, stop), checksum


def _replace(header: dict) -> dict[str, tuple[str, tuple]]:
    """A delta's carried parameters: name -> (dtype, shape); every shard gets the whole list."""
    rep = header.get("replace", {})
    if rep is None:
        return {}
    if not isinstance(rep, dict) or not all(
            valid_name(k) and isinstance(v, list) and len(v) == 2 and dtype_problem(v[0]) is None
            and isinstance(v[1], list) and len(v[1]) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v[1]) for k, v in rep.items()):
        raise ProtocolError("field 'replace' must map tensor names to [dtype, shape] (a supported dtype, "
                            "at most 8 non-negative ints)")
    return {k: (v[0], tuple(v[1])) for k, v in rep.items()}


def delta_problem(base: Slice, replace: dict[str, tuple[str, tuple]]) -> str | None:
    """What is wrong with a delta as far as this shard can see: a carried parameter whose dtype or
    shape differs from the base's. (New parameters are checked by the publisher, which sees the
    whole base; a shard may hold none of a parameter.)"""
    known = {p.param: (p.dtype, p.shape) for p in base.pieces.values()}
    for name, (dtype, shape) in sorted(replace.items()):
        if name in known and known[name] != (dtype, tuple(shape)):
            return (f"{name}: {dtype}{list(shape)} does not match the base's "
                    f"{known[name][0]}{list(known[name][1])}")
    return None


def layout(sl: Slice) -> dict[str, list]:
    """param -> [dtype, shape, [[start, stop], ...]] of what this shard holds of a version."""
    out: dict[str, list] = {}
    for p in sl.pieces.values():
        out.setdefault(p.param, [p.dtype, list(p.shape), []])[2].append([p.start, p.stop])
    return out


def _version(header: dict) -> int:
    v = header.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ProtocolError("field 'version' must be a non-negative integer")
    return v


def serve(cfg: ShardConfig, announce=None, expose=None) -> None:
    """Bind, expose metrics (`expose(registry)` returns their URL), announce, run until stopped."""
    shard = Shard(cfg)
    signal.signal(signal.SIGTERM, shard.request_stop)
    signal.signal(signal.SIGINT, shard.request_stop)
    shard._refresh_metrics()
    metrics_url = expose(shard.metrics.registry) if expose is not None else None
    if announce is not None:
        announce({"role": "paramserver", "pid": os.getpid(), "name": cfg.name, "endpoint": shard.endpoint,
                  "pub": shard.pub_endpoint, "metrics": metrics_url})
    shard.run()
