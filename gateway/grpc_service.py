"""The OIP gRPC service (``inference.GRPCInferenceService``) on ``grpc.aio``, beside the HTTP server.

It runs in its own thread with its own asyncio loop and its own master connections (an
AsyncClient belongs to one loop), sharing only the polled ModelBook, which it reads. Inputs come
from ``raw_input_contents`` (viewed in place, as Triton clients send them) or from the typed
``contents``; outputs always go back as ``raw_output_contents``. The checks and the error
mapping are the REST path's (gateway/oip.py, gateway/errors.py), with HTTP statuses turned into
gRPC codes. Code generated from the official .proto lives in gateway/oip_grpc/ (generate.sh).
"""
from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
import uuid
from typing import Callable

import grpc
import numpy as np
import structlog

from ringserve.client.aio import AsyncClient
from ringserve.gateway.app import (EXTENSIONS, MAX_TENANT_CLIENTS, SERVER_NAME, SERVER_VERSION, AppConfig, rows_of,
                                   run_call)
from ringserve.gateway.auth import Tokens
from ringserve.gateway.errors import HttpError, bad_request
from ringserve.gateway.metrics import GatewayMetrics
from ringserve.gateway.models import ModelBook
from ringserve.gateway.oip import MAX_TENSORS, InferCall, apply_parameters
from ringserve.gateway.oip_grpc import open_inference_grpc_pb2 as pb
from ringserve.gateway.oip_grpc import open_inference_grpc_pb2_grpc as pb_grpc
from ringserve.gateway.tensors import (
    STRINGS, TO_OIP, check_shape, from_bytes, from_json, numpy_dtype, strings_array, strings_buffer,
)
from ringserve.protocol.codec import MAX_NAME
from ringserve.protocol.messages import ErrorCode

log = structlog.get_logger("ringserve.gateway")

CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
         500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "INT8": "int_contents", "INT16": "int_contents",
            "INT32": "int_contents", "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


def _param_value(p: pb.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def parse_request(req: pb.ModelInferRequest, extra_tags: dict[str, str]) -> InferCall:
    """A ModelInferRequest -> a checked InferCall (HttpError 400 naming what is wrong)."""
    call = InferCall({}, request_id=req.id or None)
    apply_parameters(call, {k: _param_value(v) for k, v in req.parameters.items()}, extra_tags)
    if not 0 < len(req.inputs) <= MAX_TENSORS:
        raise bad_request(f"'inputs' must hold 1..{MAX_TENSORS} tensors")
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise bad_request(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs (all or none)")
    for k, t in enumerate(req.inputs):
        if not 0 < len(t.name) <= MAX_NAME:
            raise bad_request(f"input {k}: 'name' must be a string of 1..{MAX_NAME} characters")
        what = f"input {t.name[:64]!r}"
        if t.name in call.inputs:
            raise bad_request(f"{what} appears twice")
        dt = numpy_dtype(t.datatype, what)
        shape = check_shape(list(t.shape), what)
        if raw:
            call.inputs[t.name] = from_bytes(memoryview(raw[k]), shape, dt, what)
            continue
        if dt is STRINGS:  # bytes_contents: each element already a byte string
            items, count = list(t.contents.bytes_contents), math.prod(shape)
            if len(items) != count:
                raise bad_request(f"{what}: shape {list(shape)} needs {count} elements, bytes_contents has {len(items)}")
            call.inputs[t.name] = strings_array(items, shape)
            continue
        field = CONTENTS.get(t.datatype)
        if field is None:
            raise bad_request(f"{what}: datatype {t.datatype} must be sent in raw_input_contents")
        call.inputs[t.name] = from_json(list(getattr(t.contents, field)), shape, dt, what)
    if req.outputs:
        call.outputs = [(o.name, True) for o in req.outputs]
    return call


def build_reply(model: str, version: int | None, call: InferCall,
                outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    names = list(outputs) if call.outputs is None else [n for n, _ in call.outputs]
    resp = pb.ModelInferResponse(model_name=model, model_version="" if version is None else str(version),
                                 id=call.request_id or "")
    for name in names:
        arr = outputs.get(name)
        if arr is None:
            raise bad_request(f"model {model!r} has no output {name[:64]!r} (outputs: {sorted(outputs)})")
        resp.outputs.add(name=name, datatype=TO_OIP.get(arr.dtype, "BYTES"), shape=list(arr.shape))
        resp.raw_output_contents.append(strings_buffer(arr, name) if arr.dtype == STRINGS
                                        else np.ascontiguousarray(arr).tobytes())
    return resp


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, master: str, book: ModelBook, cfg: AppConfig, tokens: Tokens | None,
                 metrics: GatewayMetrics, new_client: Callable[[str], AsyncClient], access=None):
        self.master, self.book, self.cfg, self.tokens, self.metrics = master, book, cfg, tokens, metrics
        self.access = access or log
        self._new_client = new_client
        self.clients: dict[str | None, AsyncClient] = {}
        self._prefix = uuid.uuid4().hex[:10]
        self._ids = itertools.count()

    async def _fail(self, context, exc: HttpError):
        await context.abort(CODES.get(exc.status, grpc.StatusCode.UNKNOWN), exc.message)

    def _tenant(self, context) -> str | None:
        if self.tokens is None:
            return None
        auth = dict(context.invocation_metadata() or ()).get("authorization")
        tenant = self.tokens.tenant(auth.encode() if isinstance(auth, str) else auth)
        if tenant is None:
            raise HttpError(401, "a valid API token is needed: metadata authorization: Bearer TOKEN")
        return tenant

    def _view(self, name: str, version: str):
        view = self.book.models.get(name)
        if view is None:
            raise HttpError(404, f"{ErrorCode.UNKNOWN_MODEL}: no worker serves model {name[:128]!r}")
        if version and (not version.isdigit() or int(version) not in view.versions):
            raise HttpError(404, f"{ErrorCode.UNKNOWN_VERSION}: model {name[:128]!r} has no version {version[:32]!r}")
        return view

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.book.ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelReady(self, request, context):
        try:
            self._tenant(context)
            view = self._view(request.name, request.version)
        except HttpError as exc:
            return await self._fail(context, exc)
        ready = view.ready if not request.version else int(request.version) in view.ready_versions
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request, context):
        try:
            self._tenant(context)
            view = self._view(request.name, request.version)
        except HttpError as exc:
            return await self._fail(context, exc)
        def tensors(book):
            return [pb.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=s) for n, (d, s) in book.items()]
        return pb.ModelMetadataResponse(name=request.name, versions=[str(v) for v in sorted(view.versions)],
                                        platform="pytorch_eager", inputs=tensors(view.inputs),
                                        outputs=tensors(view.outputs))

    async def ModelInfer(self, request, context):
        t0 = time.perf_counter()
        model = request.model_name
        label = model if model in self.book.models else "_unknown"
        version_label = self.book.version_label(model, request.model_version[:16])
        rid = f"gg{self._prefix}-{next(self._ids)}"
        try:
            tenant = self._tenant(context)
            if not model:
                raise HttpError(404, f"{ErrorCode.UNKNOWN_MODEL}: no model name given")
            version = None
            if request.model_version:
                if not request.model_version.isdigit() or len(request.model_version) > 9:
                    raise HttpError(404, f"{ErrorCode.UNKNOWN_VERSION}: model {model[:128]!r} has no version "
                                    f"{request.model_version[:32]!r} (ringserve versions are integers)")
                version = int(request.model_version)
            call = parse_request(request, {"tenant": tenant} if tenant else {})
            reply = await run_call(self._client(tenant), model, version, call, rid, self.cfg)
            resp = build_reply(model, reply.version, call, reply.outputs)
        except HttpError as exc:
            self.metrics.infer_done(label, version_label, time.perf_counter() - t0, 0, exc.code)
            if self.cfg.access_log:
                self.access.info("grpc_request", method="ModelInfer", model=model[:128], status=exc.status,
                                 request_id=rid, id=request.id[:256], ms=round((time.perf_counter() - t0) * 1000, 3))
            return await self._fail(context, exc)
        self.book.learn(model, call.inputs, reply.outputs)
        self.metrics.infer_done(label, "" if reply.version is None else str(reply.version),
                                time.perf_counter() - t0, rows_of(call), None)
        if self.cfg.access_log:
            self.access.info("grpc_request", method="ModelInfer", model=model[:128], status=200, request_id=rid,
                     id=request.id[:256], ms=round((time.perf_counter() - t0) * 1000, 3))
        return resp

    def _client(self, tenant: str | None) -> AsyncClient:
        client = self.clients.get(tenant)
        if client is None:
            if tenant is not None and len(self.clients) >= MAX_TENANT_CLIENTS:
                return self._client(None)
            client = self.clients[tenant] = self._new_client(self.master)
        return client

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()


class GrpcThread:
    """The gRPC server in a daemon thread with its own loop; `start` returns once it is bound."""

    def __init__(self, service: InferenceService, address: str, max_message_bytes: int,
                 credentials: grpc.ServerCredentials | None):
        self.service, self.address, self.max_message_bytes, self.credentials = (
            service, address, max_message_bytes, credentials)
        self.port: int | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="grpc", daemon=True)

    def start(self, timeout: float = 30.0) -> int:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the gRPC server did not start")
        if self.error is not None:
            raise self.error
        return self.port

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # before start() returned: it reports it; after: logged
            if self._ready.is_set():
                log.exception("grpc_server_failed")
            self.error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        opts = [("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", max(self.max_message_bytes, 64 << 20))]
        server = grpc.aio.server(options=opts)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.service, server)
        try:
            port = (server.add_secure_port(self.address, self.credentials) if self.credentials
                    else server.add_insecure_port(self.address))
        except RuntimeError:
            port = 0
        if not port:
            raise OSError("address in use or not available")
        await server.start()
        self.port = port
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(grace=2.0)
            self.service.close()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                return
        self._thread.join(timeout=5)
