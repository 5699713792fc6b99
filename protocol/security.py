"""Authenticated, encrypted sockets: CurveZMQ keys per identity and a ZAP handler that admits roles.

Why one module: every socket in ringserve is made secure the same way, so the rules live here and
each role only says "this socket is a server for domain D" or "this socket connects to a master/shard".

Keys directory layout (made by ``ringserve-keys``)::

    DIR/public/<role>/<name>.key          public keys (what peers need; safe to copy around)
    DIR/secret/<role>/<name>.key_secret   secret keys, mode 0600, directory 0700

Roles: client, worker, admin, publisher, shard, master. A server socket (``Security.server``)
is a CURVE server whose ZAP domain names which roles may connect (``DOMAIN_ROLES``); the ZAP
handler (one thread per zmq.Context, on inproc://zeromq.zap.01) re-reads the public keys when
the directory changes, so keys are added or revoked without a restart. It sets the
connection's User-Id to ``role:name:fingerprint``; ``Security.authorize`` checks that id against
the current keys on every message, so a revoked key stops working on open connections too.
Without keys a Security still sets ZMQ_MAXMSGSIZE on every socket.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import structlog
import zmq
import zmq.auth

log = structlog.get_logger("ringserve.security")

ROLES = ("client", "worker", "admin", "publisher", "shard", "master")
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
DEFAULT_MAX_MSG_BYTES = 256 * 1024 * 1024

# Which roles may connect to each bound socket (the socket's ZAP domain).
DOMAIN_ROLES: dict[str, frozenset[str]] = {
    "master.client": frozenset({"client"}),
    "master.worker": frozenset({"worker"}),
    "master.admin": frozenset({"admin", "master"}),  # a peer master syncs routes here ('peer' only)
    "shard.cmd": frozenset({"publisher", "worker", "shard"}),  # a peer shard reads what it repairs
    "shard.pub": frozenset({"worker"}),
}

# Which roles may run each shard command (checked per message on the shard's command socket).
SHARD_COMMAND_ROLES: dict[str, frozenset[str]] = {
    "hello": frozenset({"publisher", "worker", "shard"}),
    "fetch": frozenset({"worker", "shard"}),  # a shard copies the pieces it owns from its peers (repair)
    "stage": frozenset({"publisher"}),
    "commit": frozenset({"publisher"}),
    "abort": frozenset({"publisher"}),
    "rollback": frozenset({"publisher"}),
    "revert": frozenset({"publisher"}),  # undo a failed publish everywhere
}


def shard_command_roles(header: dict) -> frozenset[str]:
    """Who may run this shard command: a publisher may read a version's manifest (fetch with
    manifest_only, to check a publish against the current layout) but never its weights."""
    cmd = header.get("cmd")
    if cmd == "fetch" and header.get("manifest_only") is True:
        return frozenset({"worker", "publisher", "shard"})
    return SHARD_COMMAND_ROLES[cmd]

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


class SecurityError(RuntimeError):
    """Keys missing or unusable, or an insecure bind that was not allowed."""


# ---------------------------------------------------------------- key files
def public_path(keys_dir: str | os.PathLike, role: str, name: str) -> Path:
    return Path(keys_dir) / "public" / role / f"{name}.key"


def secret_path(keys_dir: str | os.PathLike, role: str, name: str) -> Path:
    return Path(keys_dir) / "secret" / role / f"{name}.key_secret"


def _check_name(role: str, name: str) -> None:
    if role not in ROLES:
        raise SecurityError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    if not name or "/" in name or name.startswith(".") or ":" in name:
        raise SecurityError(f"key name {name!r} must be a plain name (no '/', ':' or leading '.')")


def create_identity(keys_dir: str | os.PathLike, role: str, name: str) -> tuple[Path, Path]:
    """Make a CURVE key pair for role/name (zmq.auth.create_certificates); secret file 0600."""
    _check_name(role, name)
    pub, sec = public_path(keys_dir, role, name), secret_path(keys_dir, role, name)
    if pub.exists() or sec.exists():
        raise SecurityError(f"{role}:{name} already exists in {keys_dir}")
    pub.parent.mkdir(parents=True, exist_ok=True)
    sec.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(Path(keys_dir) / "secret", 0o700)
    os.chmod(sec.parent, 0o700)
    with tempfile.TemporaryDirectory(dir=sec.parent) as tmp:
        os.chmod(tmp, 0o700)
        tmp_pub, tmp_sec = zmq.auth.create_certificates(tmp, name)
        os.chmod(tmp_sec, 0o600)
        os.replace(tmp_sec, sec)  # the secret never exists with wider permissions
        shutil.copyfile(tmp_pub, pub.with_suffix(".key.tmp"))
        os.replace(pub.with_suffix(".key.tmp"), pub)
    return pub, sec


def revoke_identity(keys_dir: str | os.PathLike, role: str, name: str) -> bool:
    """Remove role/name's public key (peers stop accepting it) and its secret; True if it existed."""
    _check_name(role, name)
    found = False
    for path in (public_path(keys_dir, role, name), secret_path(keys_dir, role, name)):
        if path.exists():
            path.unlink()
            found = True
    return found


def list_identities(keys_dir: str | os.PathLike) -> dict[str, list[str]]:
    out = {}
    for role in ROLES:
        d = Path(keys_dir) / "public" / role
        out[role] = sorted(p.name[:-4] for p in d.glob("*.key")) if d.is_dir() else []
    return out


def fingerprint(public_z85: bytes) -> str:
    return hashlib.sha256(public_z85).hexdigest()[:12]


class KeyRing:
    """The public keys in DIR/public, re-read when a role directory changes (checked at most every `recheck_s`)."""

    def __init__(self, keys_dir: str | os.PathLike, recheck_s: float = 0.1):
        self.keys_dir, self.recheck_s = Path(keys_dir), recheck_s
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._checked = 0.0
        self._by_key: dict[bytes, tuple[str, str]] = {}  # public z85 -> (role, name)
        self._user_ids: frozenset[str] = frozenset()

    def _scan_signature(self) -> tuple:
        sig = []
        for role in ROLES:
            d = self.keys_dir / "public" / role
            try:
                sig.append((role, d.stat().st_mtime_ns, tuple(sorted(
                    (e.name, e.stat().st_mtime_ns) for e in os.scandir(d) if e.name.endswith(".key")))))
            except FileNotFoundError:
                sig.append((role, None, ()))
        return tuple(sig)

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked < self.recheck_s:
                return
            self._checked = now
            sig = self._scan_signature()
            if sig == self._signature:
                return
            by_key = {}
            for role, _, files in sig:
                for fname, _ in files:
                    try:
                        public, _ = zmq.auth.load_certificate(self.keys_dir / "public" / role / fname)
                    except (OSError, ValueError) as exc:
                        log.warning("bad_public_key", role=role, file=fname, error=str(exc))
                        continue
                    by_key[public] = (role, fname[:-4])
            self._by_key = by_key
            self._user_ids = frozenset(f"{r}:{n}:{fingerprint(k)}" for k, (r, n) in by_key.items())
            self._signature = sig
            log.info("keys_loaded", keys=len(by_key), dir=str(self.keys_dir))

    def lookup(self, public_z85: bytes) -> tuple[str, str] | None:
        """Per handshake: an unknown key forces a re-read, so a key made a moment ago is never refused."""
        self.refresh()
        found = self._by_key.get(public_z85)
        if found is None:
            self.refresh(force=True)
            found = self._by_key.get(public_z85)
        return found

    def valid(self, user_id: str) -> bool:
        self.refresh()
        return user_id in self._user_ids


# ------------------------------------------------------------------- ZAP
class ZapHandler(threading.Thread):
    """ZAP (RFC 27) for one context: CURVE only; admit a key if its role may use the socket's domain."""

    def __init__(self, ctx: zmq.Context, keyring: KeyRing):
        super().__init__(name="ringserve-zap", daemon=True)
        self.keyring = keyring
        self.stopping = threading.Event()
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)  # bound before any server socket binds: no handshake goes unchecked
        self.allowed = self.denied = 0

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    if not self.sock.poll(100):
                        continue
                except zmq.ZMQError:  # the context was terminated or destroyed under us: nothing left to guard
                    return
                try:
                    msg = self.sock.recv_multipart()
                    self.sock.send_multipart(self.decide(msg))
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.ETERM:
                        return
                    log.exception("zap_failed")
                except Exception:
                    log.exception("zap_failed")
        finally:
            self.sock.close(linger=0)

    def decide(self, msg: list[bytes]) -> list[bytes]:
        """One ZAP request -> its reply frames (pure apart from the key lookup)."""
        if len(msg) < 6:
            return [b"1.0", b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = msg[:6]
        creds = msg[6:]

        def reply(code: bytes, text: str, user: str = "") -> list[bytes]:
            return [version, request_id, code, text.encode(), user.encode(), b""]

        dom = domain.decode("utf-8", "replace")
        roles = DOMAIN_ROLES.get(dom)
        if mechanism != b"CURVE" or not creds or roles is None:
            self.denied += 1
            log.warning("auth_refused", domain=dom, peer=address.decode("utf-8", "replace"),
                        mechanism=mechanism.decode("utf-8", "replace"), why="not CURVE or unknown domain")
            return reply(b"400", "CURVE required")
        public = zmq.utils.z85.encode(creds[0])
        found = self.keyring.lookup(public)
        if found is None or found[0] not in roles:
            self.denied += 1
            log.warning("auth_refused", domain=dom, peer=address.decode("utf-8", "replace"),
                        role=found[0] if found else None, why="wrong role" if found else "unknown key")
            return reply(b"400", "key not allowed here")
        self.allowed += 1
        role, name = found
        return reply(b"200", "OK", f"{role}:{name}:{fingerprint(public)}")


_zap_lock = threading.Lock()
_zap_handlers: dict[int, ZapHandler] = {}


def ensure_zap(ctx: zmq.Context, keyring: KeyRing) -> ZapHandler:
    """Start the context's ZAP handler once (a context has one ZAP endpoint)."""
    with _zap_lock:
        handler = _zap_handlers.get(id(ctx))
        if handler is None or not handler.is_alive():
            handler = ZapHandler(ctx, keyring)
            handler.start()
            _zap_handlers[id(ctx)] = handler
        return handler


# -------------------------------------------------------------- sockets
@dataclass
class Security:
    """How a process's sockets are secured. ``keys_dir=None``: plaintext (loopback only, see check_bind)."""

    keys_dir: str | None = None
    role: str = ""
    name: str | None = None  # which of the role's keys this process uses; None: the only one
    max_msg_bytes: int = DEFAULT_MAX_MSG_BYTES
    insecure: bool = False  # allow non-loopback binds without keys

    def __post_init__(self) -> None:
        self._keyring = KeyRing(self.keys_dir) if self.keys_dir else None
        self._own: tuple[bytes, bytes] | None = None

    @property
    def enabled(self) -> bool:
        return self.keys_dir is not None

    @property
    def keyring(self) -> KeyRing | None:
        return self._keyring

    def own_keys(self) -> tuple[bytes, bytes]:
        """Our key pair, read once: a process keeps its identity even if its files change later."""
        if self._own is None:
            self._own = self._read_own_keys()
        return self._own

    def own_name(self) -> str:
        """The name of our key: with keys, the name other roles know us by (a worker's name is its key's)."""
        return self.name or self._only_name("secret", self.role, ".key_secret")

    def _read_own_keys(self) -> tuple[bytes, bytes]:
        name = self.own_name()
        path = secret_path(self.keys_dir, self.role, name)
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise SecurityError(f"cannot read the {self.role} secret key {path}: {exc}") from exc
        if secret is None:
            raise SecurityError(f"{path} holds no secret key")
        return public, secret

    def peer_key(self, role: str, name: str | None = None) -> bytes:
        """The public key of the server we connect to (a shard by its name; the master: the only one)."""
        name = name or self._only_name("public", role, ".key")
        path = public_path(self.keys_dir, role, name)
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise SecurityError(f"no public key for {role} {name!r} at {path}: {exc}") from exc
        return public

    def _only_name(self, kind: str, role: str, suffix: str) -> str:
        d = Path(self.keys_dir) / kind / role
        names = sorted(p.name[:-len(suffix)] for p in d.glob(f"*{suffix}")) if d.is_dir() else []
        if len(names) != 1:
            raise SecurityError(f"{d}: expected exactly one {role} key, found {names or 'none'}; name one")
        return names[0]

    def _common(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_msg_bytes)

    def server(self, sock: zmq.Socket, domain: str) -> None:
        """Call before bind: a CURVE server admitting only DOMAIN_ROLES[domain] (MAXMSGSIZE always)."""
        self._common(sock)
        if not self.enabled:
            return
        if domain not in DOMAIN_ROLES:
            raise SecurityError(f"unknown ZAP domain {domain!r}")
        ensure_zap(sock.context, self._keyring)
        public, secret = self.own_keys()
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.setsockopt(zmq.CURVE_SERVER, 1)

    def client(self, sock: zmq.Socket, server_role: str, server_name: str | None = None) -> None:
        """Call before connect: authenticate with our key and insist on the server's."""
        self._common(sock)
        if not self.enabled:
            return
        public, secret = self.own_keys()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = self.peer_key(server_role, server_name)

    def authorize(self, frame: zmq.Frame, roles: frozenset[str] | set[str]) -> str | None:
        """The sender's User-Id if it may act as one of `roles` now; "" without keys; None if refused."""
        if not self.enabled:
            return ""
        user = user_id(frame)
        if not user or user.split(":", 1)[0] not in roles or not self._keyring.valid(user):
            return None
        return user


    def still_valid(self, user: str) -> bool:
        """Whether an identity admitted earlier is still in the key ring (it was not revoked)."""
        return not self.enabled or self._keyring.valid(user)


def user_id(frame: zmq.Frame) -> str | None:
    """The User-Id ZAP gave the sender's connection ("role:name:fingerprint"), None without one."""
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
        return None


def bind_host(endpoint: str) -> str | None:
    """The host part of a tcp:// endpoint; None for inproc/ipc (local by nature)."""
    if not endpoint.startswith("tcp://"):
        return None
    host = urlsplit(endpoint).hostname if "[" in endpoint else endpoint[6:].rsplit(":", 1)[0]
    return host


def check_bind(endpoint: str, keys: bool, insecure: bool) -> str | None:
    """Refuse a non-loopback plaintext bind unless --insecure. Returns a warning to log, or None."""
    host = bind_host(endpoint)
    if keys or host is None or host in LOOPBACK_HOSTS:
        return None
    if not insecure:
        raise SecurityError(f"refusing to bind {endpoint} without --keys (anyone who can reach it could "
                            f"use it); give --keys DIR, bind 127.0.0.1, or pass --insecure")
    return f"INSECURE: {endpoint} is reachable beyond this host with no authentication or encryption"
