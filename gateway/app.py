"""The OIP REST surface, called directly by the gateway's HTTP server (gateway/http11.py): no
framework, no ASGI, no task per request (routing is a split of the path).

``on_head`` answers what needs no body (health, metadata, 404, 401, 405, a declared body over the
limit) as soon as the headers are in; ``on_body`` checks an inference body, submits it to the
master and answers from the client future's done-callback. Every request gets exactly one answer:
a result or ``{"error": ...}`` with a fitting status (gateway/errors.py), including bodies that
are malformed, too large, compressed wrongly or slow to arrive; an unexpected exception is logged
and answered 500, and the gateway goes on. Inference goes to the master through one
``AsyncClient`` per tenant (so the master's per-client token bucket limits each tenant), in this
same event loop; nothing is cached or queued here beyond the requests in flight.
"""
from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import orjson
import structlog

from ringserve.client.aio import AsyncClient
from ringserve.client.errors import RingserveError
from ringserve.client.reliable import Reply as ClientReply
from ringserve.gateway.auth import Tokens
from ringserve.gateway.errors import HttpError, bad_request, from_ringserve
from ringserve.gateway.http11 import Reply, Request
from ringserve.gateway.metrics import GatewayMetrics
from ringserve.gateway.models import ModelBook
from ringserve.gateway.oip import InferCall, build_response, parse_infer, raw_response, remember_raw
from ringserve.gateway.openapi import document_bytes
from ringserve.protocol.messages import ErrorCode

log = structlog.get_logger("ringserve.gateway")

SERVER_NAME = "ringserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "parameters"]
TAG_HEADER = b"x-ringserve-tag-"  # x-ringserve-tag-user: u1 -> tags {"user": "u1"} (sticky routes)
_TAG_LEN = len(TAG_HEADER)
MAX_TENANT_CLIENTS = 256  # one master connection per tenant, at most this many
MAX_INFER_PATHS = 1024  # inference paths whose model and version are remembered
VERSION = re.compile(r"^[0-9]{1,9}$")
JSON = b"application/json"
OCTETS = b"application/octet-stream"
OPENAPI = document_bytes(SERVER_NAME, SERVER_VERSION)  # GET /v2/openapi.json: built once, from gateway/openapi.py

Answer = tuple[int, list, list]  # status, headers [(name, value)], body parts (bytes-like)


@dataclass
class AppConfig:
    max_body_bytes: int = 64 << 20
    max_json_bytes: int = 8 << 20  # the JSON part: parsed into Python objects, many times its size
    body_timeout_s: float = 30.0  # the whole body must arrive within this
    default_timeout_s: float = 30.0  # requests without a "timeout" parameter
    max_timeout_s: float = 300.0
    access_log: bool = True


class _Ctx:
    """What the gateway knows of one request, for its answer, metrics and access line."""

    __slots__ = ("rid", "t0", "endpoint", "model", "id", "tenant", "full_model", "version", "headers", "label",
                 "counted")

    def __init__(self, rid: str):
        self.rid, self.t0 = rid, time.perf_counter()
        self.endpoint = "other"
        self.model = self.id = self.tenant = self.full_model = self.version = self.label = None
        self.headers: dict = {}
        self.counted = False  # its request was counted with its inference (metrics.infer_answered)


class GatewayApp:
    def __init__(self, master: str, book: ModelBook, cfg: AppConfig | None = None, tokens: Tokens | None = None,
                 metrics: GatewayMetrics | None = None, client_factory: Callable[[str], AsyncClient] | None = None,
                 access=None):
        self.master, self.book, self.cfg, self.tokens = master, book, cfg or AppConfig(), tokens
        self.metrics = metrics or GatewayMetrics()
        self.access = access or log  # gateway/accesslog.py's batched logger when served
        self._access_http = getattr(self.access, "http_request", None)  # its line-per-request shortcut
        self._new_client = client_factory or (lambda address: AsyncClient(address))
        self.clients: dict[str | None, AsyncClient] = {}
        self._prefix = uuid.uuid4().hex[:10]
        self._ids = itertools.count()
        self._infer_paths: dict[str, tuple[str, int | None]] = {}  # path -> (model, version), bounded

    @property
    def max_body_bytes(self) -> int:  # read by gateway/http11.py while a body arrives
        return self.cfg.max_body_bytes

    @property
    def body_timeout_s(self) -> float:
        return self.cfg.body_timeout_s

    # ------------------------------------------------ the HTTP server's calls (gateway/http11.py)
    def on_head(self, req: Request) -> Answer | None:
        """The request line and headers are in: the answer now, or None when the body is needed."""
        ctx = req.ctx = _Ctx(f"gw{self._prefix}-{next(self._ids)}")
        try:
            answer = self._route(req, ctx)
        except HttpError as exc:
            answer = self._error(exc)
        except Exception:
            log.exception("gateway_handler_error", path=req.path[:200], request_id=ctx.rid)
            answer = self._error(HttpError(500, "INTERNAL: the gateway failed on this request", ErrorCode.INTERNAL))
        return None if answer is None else self._done(req, answer)

    def on_body(self, req: Request, body: bytes, reply: Reply) -> None:
        """The whole body of an inference request is in: check it, submit it, and answer once it is done."""
        ctx = req.ctx
        try:
            call, fut = self._submit(ctx, body)
        except HttpError as exc:
            self._infer_failed(ctx, exc)
            reply(*self._done(req, self._error(exc)))
            return
        except Exception:
            log.exception("gateway_handler_error", path=req.path[:200], request_id=ctx.rid)
            reply(*self._done(req, self._error(HttpError(500, "INTERNAL: the gateway failed on this request",
                                                          ErrorCode.INTERNAL))))
            return
        fut.add_done_callback(partial(self._answered, req, call, reply))  # a partial: no frame of its own

    def body_failed(self, req: Request, status: int, reply: Reply) -> None:
        """The server stopped reading a body: over the size limit (413) or past its deadline (408)."""
        if status == 413:
            exc = HttpError(413, f"body is over the limit of {self.cfg.max_body_bytes} bytes (--max-body-bytes)")
        else:
            exc = HttpError(408, f"the body did not arrive within {self.cfg.body_timeout_s:g} s")
        self._infer_failed(req.ctx, exc)
        reply(*self._done(req, self._error(exc)))

    def _done(self, req: Request, answer: Answer) -> Answer:
        """Every final answer passes here once: request id header, metrics, access line."""
        ctx = req.ctx
        status, headers, parts = answer
        headers.append((b"x-ringserve-request-id", ctx.rid.encode()))
        if not ctx.counted:
            self.metrics.request(ctx.endpoint, status)
        if self.cfg.access_log:  # ms to the microsecond (round() costs three times as much)
            ms = int((time.perf_counter() - ctx.t0) * 1e6 + 0.5) / 1000
            if self._access_http is not None:  # gateway/accesslog.py's line, rendered per route
                self._access_http(req.method, req.path[:200], status, ms, ctx.rid, ctx.id, ctx.tenant, ctx.model)
            else:
                self.access.info("http_request", method=req.method, path=req.path[:200], status=status, ms=ms,
                                 request_id=ctx.rid, id=ctx.id, tenant=ctx.tenant, model=ctx.model)
        return answer

    @staticmethod
    def _error(exc: HttpError) -> Answer:
        headers = [(b"content-type", JSON), *exc.headers]
        if exc.retry_after is not None:
            headers.append((b"retry-after", str(exc.retry_after).encode()))
        return exc.status, headers, [orjson.dumps({"error": exc.message})]

    @staticmethod
    def _json(obj, status: int = 200) -> Answer:
        return status, [(b"content-type", JSON)], [orjson.dumps(obj)]

    # --------------------------------------------------------------- routing
    def _route(self, req: Request, ctx: _Ctx) -> Answer | None:
        path, method = req.path, req.method
        known = self._infer_paths.get(path)
        if known is not None:  # an inference path seen before: its model and version, without the split
            headers = req.headers
            if self.tokens is not None:
                self._authorize(headers, ctx)
            return self._route_infer(req, ctx, known[0], known[1], headers)
        parts = path.strip("/").split("/")
        if parts[0] != "v2":
            raise HttpError(404, f"no such endpoint {path[:200]!r}: the Open Inference Protocol lives under /v2")
        rest = parts[1:]
        if rest in ([], ["health", "live"], ["health", "ready"]):
            ctx.endpoint = "health" if rest else "server_metadata"
            _method(method, "GET")
            if not rest:
                return self._json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})
            if rest[1] == "live":
                return self._json({"live": True})
            ready = self.book.ready
            return self._json({"ready": ready}, 200 if ready else 503)
        if rest == ["openapi.json"]:
            ctx.endpoint = "openapi"
            _method(method, "GET")
            return 200, [(b"content-type", JSON)], [OPENAPI]
        if len(rest) < 2 or rest[0] != "models" or not rest[1]:
            raise HttpError(404, f"no such endpoint {path[:200]!r}")
        headers = req.headers
        self._authorize(headers, ctx)
        model = rest[1]
        ctx.model = model[:128]
        rest = rest[2:]
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version = _version(model, rest[1])
            rest = rest[2:]
        if rest == []:
            ctx.endpoint = "model_metadata"
            _method(method, "GET")
            return self._json(self._model_metadata(model, version))
        if rest == ["ready"]:
            ctx.endpoint = "model_ready"
            _method(method, "GET")
            view = self._view(model, version)
            ready = view.ready if version is None else version in view.ready_versions
            return self._json({"name": model, "ready": ready}, 200 if ready else 503)
        if rest == ["infer"]:
            if len(self._infer_paths) >= MAX_INFER_PATHS:
                self._infer_paths.clear()
            self._infer_paths[path] = (model, version)
            return self._route_infer(req, ctx, model, version, headers)
        raise HttpError(404, f"no such endpoint {path[:200]!r}")

    def _route_infer(self, req: Request, ctx: _Ctx, model: str, version: int | None, headers: dict) -> None:
        ctx.endpoint = "infer"
        ctx.model = model[:128]
        ctx.full_model, ctx.version, ctx.headers = model, version, headers
        ctx.label = model if model in self.book.models else "_unknown"
        try:
            if req.method != "POST":
                _method(req.method, "POST")
            if b"content-length" in headers:
                self._check_declared(headers)
        except HttpError as exc:
            self._infer_failed(ctx, exc)
            raise
        return None  # the body is needed: on_body

    def _authorize(self, headers: dict, ctx: _Ctx) -> None:
        if self.tokens is None:
            return
        tenant = self.tokens.tenant(headers.get(b"authorization"))
        if tenant is None:
            raise HttpError(401, "a valid API token is needed: Authorization: Bearer TOKEN", "UNAUTHORIZED",
                            headers=((b"www-authenticate", b'Bearer realm="ringserve"'),))
        ctx.tenant = tenant

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
    def _check_declared(self, headers: dict) -> None:
        """A declared Content-Length over the limit is refused before any of the body is read."""
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared = int(declared)
            except ValueError:
                raise bad_request("Content-Length is not a number") from None
            if declared > self.cfg.max_body_bytes:
                raise HttpError(413, f"body of {declared} bytes is over the limit of {self.cfg.max_body_bytes} bytes "
                                     "(--max-body-bytes)")

    def _submit(self, ctx: _Ctx, body: bytes) -> tuple[InferCall, asyncio.Future]:
        """Check the body and send it to the master: (the call, the client's future)."""
        headers = ctx.headers
        encoding = headers.get(b"content-encoding")
        if encoding is not None and encoding != b"identity":
            body = _decompress(body, encoding, self.cfg.max_body_bytes)
        body = memoryview(body)
        header_length = _header_length(headers) if b"inference-header-content-length" in headers else None
        json_bytes = len(body) if header_length is None or header_length > len(body) else header_length
        if json_bytes > self.cfg.max_json_bytes:  # a length past the body: 400
            raise HttpError(413, f"the JSON part of the body is over {self.cfg.max_json_bytes} bytes "
                                 "(--max-json-bytes): send large tensors as binary data")
        call = parse_infer(body, header_length, _tag_headers(headers, ctx.tenant))
        ctx.id = call.request_id
        return call, submit_call(self._client(ctx.tenant), ctx.full_model, ctx.version, call, ctx.rid, self.cfg)

    def _answered(self, req: Request, call: InferCall, reply: Reply, fut: asyncio.Future) -> None:
        """The master's answer (or typed error) is in: build the response and write it."""
        ctx = req.ctx
        try:
            answer = self._response(ctx, call, fut)
        except HttpError as exc:
            self._infer_failed(ctx, exc)
            answer = self._error(exc)
        except Exception:
            log.exception("gateway_handler_error", path=req.path[:200], request_id=ctx.rid)
            exc = HttpError(500, "INTERNAL: the gateway failed on this request", ErrorCode.INTERNAL)
            self._infer_failed(ctx, exc)
            answer = self._error(exc)
        reply(*self._done(req, answer))

    def _response(self, ctx: _Ctx, call: InferCall, fut: asyncio.Future) -> Answer:
        if fut.cancelled():
            raise HttpError(503, "the gateway's master connection closed before an answer arrived", retry_after=1)
        try:
            reply = fut.result()
        except RingserveError as exc:
            raise from_ringserve(exc) from None
        model, version = ctx.full_model, reply.version
        wire = reply.raw  # the checked buffers: an all-binary answer of a known form is written from them
        hit = None if wire is None else raw_response(model, version, call, wire[0], wire[1])
        if hit is not None:
            head, parts, hlen_ascii = hit
            if not self.book.knows(model, (call.plan, head)):
                self.book.learn(model, call.inputs, reply.outputs, (call.plan, head))
            headers = [(b"content-type", OCTETS), (b"inference-header-content-length", hlen_ascii)]
        else:
            outputs = reply.outputs
            head, raw, hlen = build_response(model, version, call, outputs)
            self.book.learn(model, call.inputs, outputs, (call.plan, head))
            if wire is not None and hlen is not None:
                remember_raw(model, version, call, wire[0], outputs, head)
            parts = [head, *raw]
            headers = ([(b"content-type", JSON)] if hlen is None else
                       [(b"content-type", OCTETS), (b"inference-header-content-length", str(hlen).encode())])
        ctx.counted = True  # with its endpoint's 200, in the same call
        self.metrics.infer_answered(ctx.label, "" if version is None else str(version),
                                    time.perf_counter() - ctx.t0, rows_of(call), ctx.endpoint)
        return 200, headers, parts

    def _infer_failed(self, ctx: _Ctx, exc: HttpError) -> None:
        self.metrics.infer_done(ctx.label, self.book.version_label(ctx.full_model, ctx.version),
                                time.perf_counter() - ctx.t0, 0, exc.code)

    def _client(self, tenant: str | None) -> AsyncClient:
        client = self.clients.get(tenant)
        if client is None:
            if tenant is not None and len(self.clients) >= MAX_TENANT_CLIENTS:
                return self._client(None)  # beyond the bound, tenants share the default connection
            client = self.clients[tenant] = self._new_client(self.master)
        return client

    async def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()


def submit_call(client: AsyncClient, model: str, version: int | None, call: InferCall, rid: str,
                cfg: AppConfig) -> asyncio.Future:
    """Send one checked call to the master: the client's timers fail its future at its deadline (plus a
    grace), so it always resolves (HttpError 400 for inputs the client cannot encode)."""
    timeout = min(call.timeout_s or cfg.default_timeout_s, cfg.max_timeout_s)
    try:
        return client.submit(model, call.inputs, timeout, version, request_id=rid, tags=call.tags or None)
    except (ValueError, TypeError) as exc:
        raise bad_request(str(exc)) from None


async def run_call(client: AsyncClient, model: str, version: int | None, call: InferCall, rid: str,
                   cfg: AppConfig) -> ClientReply:
    """Send one checked call to the master and wait for its one answer (HttpError for a typed error)."""
    fut = submit_call(client, model, version, call, rid, cfg)
    try:  # the client's timers fail it at its deadline (plus a grace): it always resolves
        return await fut
    except RingserveError as exc:
        raise from_ringserve(exc) from None


def rows_of(call: InferCall) -> int:
    if call.plan is not None:  # a binary or JSON body's checked header: decided once for it
        return call.plan.rows
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
    for name in headers:
        if name[:_TAG_LEN] == TAG_HEADER:  # a slice compare: cheaper than a startswith call, per header per request
            tags[name[_TAG_LEN:].decode("latin-1")[:256]] = headers[name].decode("latin-1")[:256]
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
