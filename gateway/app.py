"""The OIP REST surface as a plain ASGI app (no framework: routing is a split of the path).

Every request gets exactly one answer: a result or ``{"error": ...}`` with a fitting status
(gateway/errors.py), including bodies that are malformed, too large, compressed wrongly or
slow to arrive; an unexpected exception is logged and answered 500, and the gateway goes on.
Inference goes to the master through one ``AsyncClient`` per tenant (so the master's per-client
token bucket limits each tenant), in this same event loop; nothing is cached or queued here
beyond the requests in flight.
"""
from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Awaitable, Callable

import orjson
import structlog

from ringserve.client.aio import AsyncClient
from ringserve.client.errors import RingserveError
from ringserve.client.reliable import Reply
from ringserve.gateway.auth import Tokens
from ringserve.gateway.errors import HttpError, bad_request, from_ringserve
from ringserve.gateway.metrics import GatewayMetrics
from ringserve.gateway.models import ModelBook
from ringserve.gateway.oip import InferCall, build_response, parse_infer
from ringserve.gateway.openapi import document_bytes
from ringserve.protocol.messages import ErrorCode

log = structlog.get_logger("ringserve.gateway")

SERVER_NAME = "ringserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "parameters"]
TAG_HEADER = b"x-ringserve-tag-"  # x-ringserve-tag-user: u1 -> tags {"user": "u1"} (sticky routes)
MAX_TENANT_CLIENTS = 256  # one master connection per tenant, at most this many
JOIN_BELOW = 64 << 10  # output bytes up to this are sent in one write with the JSON header
VERSION = re.compile(r"^[0-9]{1,9}$")
JSON = b"application/json"
_TIMED_OUT = -1.0
OPENAPI = document_bytes(SERVER_NAME, SERVER_VERSION)  # GET /v2/openapi.json: built once, from gateway/openapi.py

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]


@dataclass
class AppConfig:
    max_body_bytes: int = 64 << 20
    max_json_bytes: int = 8 << 20  # the JSON part: parsed into Python objects, many times its size
    body_timeout_s: float = 30.0  # the whole body must arrive within this
    default_timeout_s: float = 30.0  # requests without a "timeout" parameter
    max_timeout_s: float = 300.0
    access_log: bool = True


class Disconnected(Exception):
    """The client went away before its body arrived: nobody to answer."""


class GatewayApp:
    def __init__(self, master: str, book: ModelBook, cfg: AppConfig | None = None, tokens: Tokens | None = None,
                 metrics: GatewayMetrics | None = None, client_factory: Callable[[str], AsyncClient] | None = None,
                 access=None):
        self.master, self.book, self.cfg, self.tokens = master, book, cfg or AppConfig(), tokens
        self.metrics = metrics or GatewayMetrics()
        self.access = access or log  # gateway/accesslog.py's batched logger when served
        self._new_client = client_factory or (lambda address: AsyncClient(address))
        self.clients: dict[str | None, AsyncClient] = {}
        self._prefix = uuid.uuid4().hex[:10]
        self._ids = itertools.count()
        self._reading: dict[asyncio.Task, float] = {}  # requests whose body is arriving -> deadline
        self._sweeper: asyncio.Task | None = None

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        t0 = time.perf_counter()
        rid = f"gw{self._prefix}-{next(self._ids)}"
        ctx = {"model": None, "id": None, "tenant": None, "rid": rid}
        try:
            status, headers, parts = await self._handle(scope, receive, ctx)
        except Disconnected:
            return
        except HttpError as exc:
            status, headers, parts = self._error(exc)
        except Exception:
            log.exception("gateway_handler_error", path=scope.get("path", "")[:200], request_id=rid)
            status, headers, parts = self._error(HttpError(500, "INTERNAL: the gateway failed on this request",
                                                           ErrorCode.INTERNAL))
        await self._send(send, status, headers, parts, rid)
        self.metrics.request(ctx.get("endpoint", "other"), status)
        if self.cfg.access_log:
            self.access.info("http_request", method=scope["method"], path=scope["path"][:200], status=status,
                             ms=round((time.perf_counter() - t0) * 1000, 3), request_id=rid, id=ctx["id"],
                             tenant=ctx["tenant"], model=ctx["model"])

    async def _send(self, send: Send, status: int, headers: list, parts: list, rid: str) -> None:
        length = sum(len(p) for p in parts)
        headers.append((b"content-length", str(length).encode()))
        headers.append((b"x-ringserve-request-id", rid.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if len(parts) > 1 and length <= JOIN_BELOW:
            parts = [b"".join(parts)]
        for k, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": k < len(parts) - 1})
        if not parts:
            await send({"type": "http.response.body", "body": b""})

    @staticmethod
    def _error(exc: HttpError) -> tuple[int, list, list]:
        headers = [(b"content-type", JSON), *exc.headers]
        if exc.retry_after is not None:
            headers.append((b"retry-after", str(exc.retry_after).encode()))
        return exc.status, headers, [orjson.dumps({"error": exc.message})]

    @staticmethod
    def _json(obj, status: int = 200) -> tuple[int, list, list]:
        return status, [(b"content-type", JSON)], [orjson.dumps(obj)]

    # --------------------------------------------------------------- routing
    async def _handle(self, scope: dict, receive: Receive, ctx: dict) -> tuple[int, list, list]:
        path, method = scope["path"], scope["method"]
        parts = path.strip("/").split("/")
        if parts[0] != "v2":
            raise HttpError(404, f"no such endpoint {path[:200]!r}: the Open Inference Protocol lives under /v2")
        rest = parts[1:]
        if rest in ([], ["health", "live"], ["health", "ready"]):
            ctx["endpoint"] = "health" if rest else "server_metadata"
            _method(method, "GET")
            if not rest:
                return self._json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})
            if rest[1] == "live":
                return self._json({"live": True})
            ready = self.book.ready
            return self._json({"ready": ready}, 200 if ready else 503)
        if rest == ["openapi.json"]:
            ctx["endpoint"] = "openapi"
            _method(method, "GET")
            return 200, [(b"content-type", JSON)], [OPENAPI]
        if len(rest) < 2 or rest[0] != "models" or not rest[1]:
            raise HttpError(404, f"no such endpoint {path[:200]!r}")
        headers = dict(scope["headers"])
        self._authorize(headers, ctx)
        model = rest[1]
        ctx["model"] = model[:128]
        rest = rest[2:]
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version = _version(model, rest[1])
            rest = rest[2:]
        if rest == []:
            ctx["endpoint"] = "model_metadata"
            _method(method, "GET")
            return self._json(self._model_metadata(model, version))
        if rest == ["ready"]:
            ctx["endpoint"] = "model_ready"
            _method(method, "GET")
            view = self._view(model, version)
            ready = view.ready if version is None else version in view.ready_versions
            return self._json({"name": model, "ready": ready}, 200 if ready else 503)
        if rest == ["infer"]:
            ctx["endpoint"] = "infer"
            _method(method, "POST")
            return await self._infer(model, version, headers, receive, ctx)
        raise HttpError(404, f"no such endpoint {path[:200]!r}")

    def _authorize(self, headers: dict, ctx: dict) -> None:
        if self.tokens is None:
            return
        tenant = self.tokens.tenant(headers.get(b"authorization"))
        if tenant is None:
            raise HttpError(401, "a valid API token is needed: Authorization: Bearer TOKEN", "UNAUTHORIZED",
                            headers=((b"www-authenticate", b'Bearer realm="ringserve"'),))
        ctx["tenant"] = tenant

    def _view(self, model: str, version: int | None):
        view = self.book.models.get(model)
        if view is None:
            if not self.book.reachable:
                raise HttpError(503, "the gateway cannot reach the master's status", retry_after=1)
            raise HttpError(404, f"{ErrorCode.UNKNOWN_MODEL}: no worker serves model {model[:128]!r}",
                            ErrorCode.UNKNOWN_MODEL)
        if version is not None and version not in view.versions:
            raise HttpError(404, f"{ErrorCode.UNKNOWN_VERSION}: model {model[:128]!r} has no version {version} "
                            f"(held: {sorted(view.versions)})", ErrorCode.UNKNOWN_VERSION)
        return view

    def _model_metadata(self, model: str, version: int | None) -> dict:
        view = self._view(model, version)
        def tensors(book):
            return [{"name": n, "datatype": d, "shape": s} for n, (d, s) in book.items()]
        return {"name": model, "versions": [str(v) for v in sorted(view.versions)], "platform": "pytorch_eager",
                "inputs": tensors(view.inputs), "outputs": tensors(view.outputs)}

    # ------------------------------------------------------------- inference
    async def _infer(self, model: str, version: int | None, headers: dict, receive: Receive,
                     ctx: dict) -> tuple[int, list, list]:
        t0 = time.perf_counter()
        label = model if model in self.book.models else "_unknown"
        try:
            body = await self._read_body(headers, receive)
            header_length = _header_length(headers)
            if min(len(body), header_length or len(body)) > self.cfg.max_json_bytes:  # a length past the body: 400
                raise HttpError(413, f"the JSON part of the body is over {self.cfg.max_json_bytes} bytes "
                                     "(--max-json-bytes): send large tensors as binary data")
            call = parse_infer(body, header_length, _tag_headers(headers, ctx.get("tenant")))
            ctx["id"] = call.request_id
            status, out, reply_version, rows = await self._run(model, version, call, ctx)
        except HttpError as exc:
            self.metrics.infer_done(label, self.book.version_label(model, version), time.perf_counter() - t0, 0,
                                    exc.code)
            raise
        self.metrics.infer_done(label, "" if reply_version is None else str(reply_version),
                                time.perf_counter() - t0, rows, None)
        return status, *out

    async def _run(self, model: str, version: int | None, call: InferCall, ctx: dict):
        client = self._client(ctx.get("tenant"))
        reply = await run_call(client, model, version, call, ctx["rid"], self.cfg)
        head, raw, hlen = build_response(model, reply.version, call, reply.outputs)
        self.book.learn(model, call.inputs, reply.outputs)
        headers = [(b"content-type", JSON if hlen is None else b"application/octet-stream")]
        if hlen is not None:
            headers.append((b"inference-header-content-length", str(hlen).encode()))
        return 200, (headers, [head, *raw]), reply.version, rows_of(call)

    def _client(self, tenant: str | None) -> AsyncClient:
        client = self.clients.get(tenant)
        if client is None:
            if tenant is not None and len(self.clients) >= MAX_TENANT_CLIENTS:
                return self._client(None)  # beyond the bound, tenants share the default connection
            client = self.clients[tenant] = self._new_client(self.master)
        return client

    async def _read_body(self, headers: dict, receive: Receive) -> memoryview:
        """The whole body, bounded in size and time; decompressed when Content-Encoding says so."""
        limit = self.cfg.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared = int(declared)
            except ValueError:
                raise bad_request("Content-Length is not a number") from None
            if declared > limit:
                raise HttpError(413, f"body of {declared} bytes is over the limit of {limit} bytes "
                                     "(--max-body-bytes)")
        chunks, size = [], 0
        task = asyncio.current_task()
        self._reading[task] = time.monotonic() + self.cfg.body_timeout_s  # the sweeper cancels it past this
        self._start_sweeper()
        try:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise Disconnected()
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise HttpError(413, f"body is over the limit of {limit} bytes (--max-body-bytes)")
                if chunk:
                    chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
        except asyncio.CancelledError:
            if self._reading.get(task) != _TIMED_OUT:
                raise  # cancelled by someone else: not ours to swallow
            if hasattr(task, "uncancel"):  # Python 3.11+
                task.uncancel()
            raise HttpError(408, f"the body did not arrive within {self.cfg.body_timeout_s:g} s") from None
        finally:
            self._reading.pop(task, None)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = headers.get(b"content-encoding")
        if encoding is not None and encoding != b"identity":
            body = _decompress(body, encoding, limit)
        return memoryview(body)

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Cancel body reads past their deadline: one timer for all requests, not one each."""
        step = min(0.25, self.cfg.body_timeout_s / 4)
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for task, deadline in list(self._reading.items()):
                if deadline != _TIMED_OUT and now >= deadline:
                    self._reading[task] = _TIMED_OUT
                    task.cancel()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for client in self.clients.values():
            client.close()
        self.clients.clear()


async def run_call(client: AsyncClient, model: str, version: int | None, call: InferCall, rid: str,
                   cfg: AppConfig) -> Reply:
    """Send one checked call to the master and wait for its one answer (HttpError for a typed error)."""
    timeout = min(call.timeout_s or cfg.default_timeout_s, cfg.max_timeout_s)
    try:
        fut = client.submit(model, call.inputs, timeout, version, request_id=rid, tags=call.tags or None)
    except (ValueError, TypeError) as exc:
        raise bad_request(str(exc)) from None
    try:  # the client's timers fail it at its deadline (plus a grace): it always resolves
        return await fut
    except RingserveError as exc:
        raise from_ringserve(exc) from None


def rows_of(call: InferCall) -> int:
    first = next(iter(call.inputs.values()))
    return first.shape[0] if first.ndim else 1


def _method(method: str, allowed: str) -> None:
    if method != allowed:
        raise HttpError(405, f"method {method} is not allowed here; use {allowed}",
                        headers=((b"allow", allowed.encode()),))


def _version(model: str, text: str) -> int:
    if not VERSION.match(text):
        raise HttpError(404, f"{ErrorCode.UNKNOWN_VERSION}: model {model[:128]!r} has no version {text[:32]!r} "
                        "(ringserve versions are integers)", ErrorCode.UNKNOWN_VERSION)
    return int(text)


def _header_length(headers: dict) -> int | None:
    value = headers.get(b"inference-header-content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise bad_request("Inference-Header-Content-Length is not a number") from None


def _tag_headers(headers: dict, tenant: str | None) -> dict[str, str]:
    tags = {}
    for name, value in headers.items():
        if name.startswith(TAG_HEADER):
            tags[name[len(TAG_HEADER):].decode("latin-1")[:256]] = value.decode("latin-1")[:256]
    if tenant is not None:
        tags["tenant"] = tenant  # the token's tenant wins over anything the request says
    return tags


def _decompress(body: bytes, encoding: bytes, limit: int) -> bytes:
    """gzip or deflate, never more than `limit` bytes out (a small bomb cannot fill memory)."""
    wbits = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}.get(encoding.lower())
    if wbits is None:
        raise HttpError(415, f"Content-Encoding {encoding[:32].decode('latin-1')!r} is not supported "
                             "(gzip, deflate, identity)")
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad_request(f"body is not valid {encoding.decode('latin-1')}: {exc}") from None
    if len(out) > limit:
        raise HttpError(413, f"decompressed body is over the limit of {limit} bytes (--max-body-bytes)")
    if not d.eof:
        raise bad_request(f"{encoding.decode('latin-1')} body is truncated")
    return out
