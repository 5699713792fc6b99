"""The gateway's REST surface as an OpenAPI 3 document, built from its own route table.

Served at ``GET /v2/openapi.json`` so users (and tools such as schemathesis, Postman or code
generators) can see what the gateway answers. The paths, methods and JSON bodies follow the Open
Inference Protocol's REST description (kserve/open-inference-protocol
``open_inference_rest.yaml``), in ringserve's words, with what ringserve adds or narrows stated:
the version segment is optional, an input may carry ``parameters.binary_data_size`` instead of
``data`` (Triton's binary tensor data extension, body ``application/octet-stream`` with
``Inference-Header-Content-Length``), every error body is ``{"error": ...}`` with the statuses of
docs/gateway.md, and the readiness endpoints answer 503 when not ready.
"""
from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(frozen=True)
class Route:
    """One REST endpoint: what the router in gateway/app.py serves at `path` for `method`."""

    method: str
    path: str  # OpenAPI template: {model_name}, {model_version}
    endpoint: str  # the metrics label gateway/app.py gives it
    summary: str
    ok: str  # the schema of its 200 body (components/schemas)
    errors: tuple[int, ...]  # statuses other than 200 it may answer (the body is then `error`)


_MODEL = (400, 401, 404, 503)  # 400: a name the wire cannot carry; 401: tokens; 503: master unreachable
_INFER = (400, 401, 404, 408, 413, 415, 429, 500, 503, 504)

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v2/health/live", "health", "Server live: the gateway answers", "live", ()),
    Route("GET", "/v2/health/ready", "health", "Server ready: a master with a ready worker is reachable", "ready",
          (503,)),
    Route("GET", "/v2", "server_metadata", "Server metadata", "server_metadata", ()),
    Route("GET", "/v2/", "server_metadata", "Server metadata (the spelling of the OIP document)", "server_metadata",
          ()),
    Route("GET", "/v2/openapi.json", "openapi", "This document", "openapi", ()),
    Route("GET", "/v2/models/{model_name}", "model_metadata", "Model metadata (every version held)",
          "model_metadata", _MODEL),
    Route("GET", "/v2/models/{model_name}/versions/{model_version}", "model_metadata", "Model metadata of a version",
          "model_metadata", _MODEL),
    Route("GET", "/v2/models/{model_name}/ready", "model_ready", "Model ready: some worker serves it",
          "model_ready", _MODEL),
    Route("GET", "/v2/models/{model_name}/versions/{model_version}/ready", "model_ready",
          "Model ready: some worker serves this version", "model_ready", _MODEL),
    Route("POST", "/v2/models/{model_name}/infer", "infer", "Inference; the master's routes choose the version",
          "inference_response", _INFER),
    Route("POST", "/v2/models/{model_name}/versions/{model_version}/infer", "infer",
          "Inference on a pinned version", "inference_response", _INFER),
)

_REF = "#/components/schemas/"


def _ref(name: str) -> dict:
    return {"$ref": _REF + name}


def _obj(props: dict, required: tuple = ()) -> dict:
    out = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    return out


_STR, _BOOL = {"type": "string"}, {"type": "boolean"}
_SHAPE = {"type": "array", "items": {"type": "integer"}}

SCHEMAS = {
    "error": _obj({"error": _STR}, ("error",)),
    "live": _obj({"live": _BOOL}, ("live",)),
    "ready": _obj({"ready": _BOOL}, ("ready",)),
    "model_ready": _obj({"name": _STR, "ready": _BOOL}, ("name", "ready")),
    "openapi": {"type": "object"},
    "server_metadata": _obj({"name": _STR, "version": _STR, "extensions": {"type": "array", "items": _STR}},
                            ("name", "version", "extensions")),
    "metadata_tensor": _obj({"name": _STR, "datatype": _STR, "shape": _SHAPE}, ("name", "datatype", "shape")),
    "model_metadata": _obj({"name": _STR, "versions": {"type": "array", "items": _STR}, "platform": _STR,
                            "inputs": {"type": "array", "items": _ref("metadata_tensor")},
                            "outputs": {"type": "array", "items": _ref("metadata_tensor")}}, ("name", "platform")),
    "parameters": {"type": "object", "description": "binary_data_output, timeout (microseconds) and, for the "
                   "master's routes, string/number/boolean values passed on as tags (a sticky key)"},
    "tensor_data": {"type": "array", "description": "row-major, flat or nested",
                    "items": {"anyOf": [_ref("tensor_data"), {"type": "number"}, _STR, _BOOL]}},
    "request_input": _obj({"name": _STR, "shape": _SHAPE, "datatype": _STR, "parameters": _ref("parameters"),
                           "data": _ref("tensor_data")}, ("name", "shape", "datatype")),
    "request_output": _obj({"name": _STR, "parameters": _ref("parameters")}, ("name",)),
    "inference_request": _obj({"id": _STR, "parameters": _ref("parameters"),
                               "inputs": {"type": "array", "items": _ref("request_input")},
                               "outputs": {"type": "array", "items": _ref("request_output")}}, ("inputs",)),
    "response_output": _obj({"name": _STR, "shape": _SHAPE, "datatype": _STR, "parameters": _ref("parameters"),
                             "data": _ref("tensor_data")}, ("name", "shape", "datatype")),
    "inference_response": _obj({"model_name": _STR, "model_version": _STR, "id": _STR,
                                "parameters": _ref("parameters"),
                                "outputs": {"type": "array", "items": _ref("response_output")}},
                               ("model_name", "outputs")),
}

_REASONS = {400: "Bad request", 401: "No valid API token", 404: "Unknown model or version",
            405: "Method not allowed", 408: "The body did not arrive in time",
            413: "Body too large", 415: "Unsupported Content-Encoding", 429: "Over the rate limit or queue",
            500: "Internal error", 503: "Not ready, or no worker for now", 504: "Timed out"}
_JSON = "application/json"


def _param(name: str, what: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": what}


def _operation(route: Route) -> dict:
    responses: dict = {"200": {"description": "OK", "content": {_JSON: {"schema": _ref(route.ok)}}}}
    if route.endpoint == "infer":
        responses["200"]["content"]["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"}}
        responses["200"]["headers"] = {"Inference-Header-Content-Length": {
            "description": "length of the JSON header before the binary outputs", "schema": {"type": "integer"}}}
    for status in route.errors:
        responses[str(status)] = {"description": _REASONS[status], "content": {_JSON: {"schema": _ref("error")}}}
    op: dict = {"summary": route.summary, "operationId": f"{route.method.lower()}{route.path}", "responses": responses}
    params = []
    if "{model_name}" in route.path:
        params.append(_param("model_name", "a model some worker serves"))
    if "{model_version}" in route.path:
        params.append(_param("model_version", "a version number (ringserve versions are integers)"))
    if params:
        op["parameters"] = params
    if route.method == "POST":
        op["requestBody"] = {"required": True, "content": {
            _JSON: {"schema": _ref("inference_request")},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                         "description": "binary tensor data: a JSON inference_request of "
                                                        "Inference-Header-Content-Length bytes, then the inputs' "
                                                        "bytes"}}}
    return op


def document(server: str, version: str) -> dict:
    paths: dict = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {"openapi": "3.0.3",
            "info": {"title": f"{server} gateway: Open Inference Protocol (REST)", "version": version,
                     "description": "The Open Inference Protocol v2 REST API with Triton's binary tensor data "
                                    "extension; see docs/gateway.md"},
            "paths": paths, "components": {"schemas": SCHEMAS}}


def document_bytes(server: str, version: str) -> bytes:
    return orjson.dumps(document(server, version))
