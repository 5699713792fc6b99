"""The gateway's own OpenAPI document, fuzzed with schemathesis against a real cluster, and the
master's sticky routes reached through the gateway (a request parameter or a tag header).

One cluster for the module: a master, two workers serving the demo MLP as versions 3 and 4
(different weights), a gateway. Tests leave it as they found it (a route is cleared after use).
"""
from __future__ import annotations

import json
import time
import urllib.request
from collections import defaultdict

import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_headers_conformance, response_schema_conformance, status_code_conformance,
)

from conftest import Cluster  # noqa: E402
from ringserve.client.admin import AdminClient  # noqa: E402
from ringserve.gateway.openapi import ROUTES  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_for_workers, wait_until  # noqa: E402
from ringserve.master.routing import choose, make_route  # noqa: E402

pytestmark = pytest.mark.timeout(120)

FUZZ_SECONDS = 20.0  # the whole fuzz, shared out between the operations: each stops drawing past its share
EXAMPLES = 15  # per operation and kind of example
X = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)
JSON_BODY = {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": X.ravel().tolist()}]}
BINARY_HEAD = json.dumps({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32",
                                      "parameters": {"binary_data_size": X.nbytes}}],
                          "parameters": {"binary_data_output": True}}).encode()
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("gateway-openapi"))
    try:
        c.start_master("--max-queue", "64")
        workers = [c._start("ringserve.launch.worker", ["--master", c.master.info["backend"], "--name", f"v{v}",
                                                       "--threads", "1", "--heartbeat-interval", "0.2", "--model",
                                                       f"mlp=ringserve.worker.demo:mlp,arg.seed={v},version={v}"],
                            f"v{v}", wait_ready=False) for v in (3, 4)]
        for w in workers:
            w.wait_ready(90)
        c.workers += workers
        wait_for_workers(c.admin, 2, 60)
        gw = RoleProcess("ringserve.launch.gateway", ["--master", c.frontend, "--admin", c.admin, "--listen",
                                                      "127.0.0.1:0", "--status-interval", "0.2"],
                         c.tmp / "gateway.log", wait_ready=False)
        c.procs.append(gw)
        gw.wait_ready(60)
        wait_until(lambda: get(gw.info["url"] + "/v2/health/ready")[0] == 200, 30, what="gateway ready")
        yield c, gw
    finally:
        c.stop_all()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def infer(url: str, body: dict, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url + "/v2/models/mlp/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})}, method="POST")
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


def strategy(op):
    """Schema-valid and schema-invalid examples; for inference also bodies the MLP accepts (JSON and
    binary), so the fuzzed names and versions meet real answers too."""
    from hypothesis import strategies as st

    kinds = [op.as_strategy(GenerationMode.POSITIVE)]
    if "parameters" in op.definition.raw or op.method.upper() == "POST":
        kinds.append(op.as_strategy(GenerationMode.NEGATIVE))
    if op.method.upper() == "POST":
        kinds.append(op.as_strategy(body=JSON_BODY, media_type="application/json"))
        kinds.append(op.as_strategy(body=BINARY_HEAD + X.tobytes(), media_type="application/octet-stream",
                                    headers={"Inference-Header-Content-Length": str(len(BINARY_HEAD))}))
    return st.one_of(kinds)


# What OIP's REST description (kserve/open-inference-protocol open_inference_rest.yaml) states, in
# our words: its paths and methods (its ${MODEL_NAME}/${MODEL_VERSION} spelled as OpenAPI templates)
# and the fields each body must have.
OIP_OPERATIONS = {("get", "/v2/health/live"), ("get", "/v2/health/ready"), ("get", "/v2/"),
                  ("get", "/v2/models/{model_name}/versions/{model_version}"),
                  ("get", "/v2/models/{model_name}/versions/{model_version}/ready"),
                  ("post", "/v2/models/{model_name}/versions/{model_version}/infer")}
OIP_REQUIRED = {"server_metadata": {"name", "version", "extensions"}, "model_metadata": {"name", "platform"},
                "metadata_tensor": {"name", "datatype", "shape"}, "inference_request": {"inputs"},
                "request_output": {"name"}, "inference_response": {"model_name", "outputs"}, "error": {"error"}}


def test_the_document_agrees_with_the_oip_rest_description():
    """Every OIP operation is in the document with the same method; every body has OIP's required
    fields and no more, except `data`, which the binary extension lets a tensor leave out."""
    from ringserve.gateway.openapi import document

    doc = document("ringserve", "test")
    ours = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert OIP_OPERATIONS <= ours
    schemas = doc["components"]["schemas"]
    for name, required in OIP_REQUIRED.items():
        assert set(schemas[name].get("required", ())) == required, name
    for name in ("request_input", "response_output"):  # OIP requires data too; binary tensors carry none
        assert set(schemas[name]["required"]) == {"name", "shape", "datatype"}
    infer = doc["paths"]["/v2/models/{model_name}/versions/{model_version}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/inference_request")
    assert infer["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/inference_response")
    assert {"400", "404", "429", "503", "504"} <= set(infer["responses"])


def test_the_document_lists_every_route_and_each_is_served(env):
    _, gw = env
    status, body = get(gw.info["url"] + "/v2/openapi.json")
    doc = json.loads(body)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {(r.method.lower(), r.path) for r in ROUTES} == {(m, p) for p, ops in doc["paths"].items() for m in ops}
    for r in ROUTES:  # every GET in the table answers as its document says, with the model filled in
        if r.method == "GET":
            path = r.path.replace("{model_name}", "mlp").replace("{model_version}", "3")
            status, body = get(gw.info["url"] + path)
            assert status == 200 and isinstance(json.loads(body), dict), (path, status, body[:200])


def test_schemathesis_finds_no_server_error_and_every_answer_conforms(env):
    """Examples drawn from the served document (model names: one served, one not; versions: held,
    not held, not a number), bounded in count, per request and in total; every answer is checked
    against the document: no 5xx, a documented status, content type, headers and body."""
    _, gw = env
    url = gw.info["url"]
    doc = json.loads(get(url + "/v2/openapi.json")[1])
    for ops in doc["paths"].values():  # fill the model in: names and versions the cluster has, and some it lacks
        for op in ops.values():
            for p in op.get("parameters", ()):
                p["schema"] = {"type": "string", "enum": ["mlp", "nope"] if p["name"] == "model_name"
                               else ["3", "4", "9", "x1"]}
    schema = schemathesis.openapi.from_dict(doc)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) == len(ROUTES)
    share = FUZZ_SECONDS / len(operations)
    statuses = defaultdict(int)

    for op in operations:
        stop_at = time.monotonic() + share

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy(op))
        def check(case):
            # past its share of the time an operation stops, once it has had one request (on a loaded
            # machine drawing the first example can take the whole share): still bounded by max_examples
            if time.monotonic() > stop_at and any(label == op.label for label, _ in statuses):  # noqa: B023
                return
            response = case.call(base_url=url, timeout=10)  # a hang is a failure, not a stuck test
            statuses[(case.operation.label, response.status_code)] += 1
            case.validate_response(response, checks=CHECKS)

        check()
    assert {label for label, _ in statuses} == {op.label for op in operations}, dict(statuses)
    infer = {s for (label, s) in statuses if label.startswith("POST")}
    assert 400 in infer and 404 in infer, dict(statuses)  # and 200 too unless the machine is very slow
    status, _ = get(url + "/v2/health/live")  # and the gateway still serves
    assert status == 200


def test_sticky_key_through_a_parameter_and_a_header_lands_where_the_master_decides(env):
    c, gw = env
    admin = AdminClient(c.admin)
    assert admin.route("mlp", split="3=50,4=50", sticky_key="user")["ok"]
    try:
        route = make_route("mlp", "3=50,4=50", sticky_key="user")
        x = np.ones((1, 256), np.float32).ravel().tolist()
        body = {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": x}]}
        seen = defaultdict(set)
        for i in range(40):
            user = f"u{i % 10}"
            if (i // 10) % 2:  # each user both ways
                reply = infer(gw.info["url"], {**body, "parameters": {"user": user}})
            else:
                reply = infer(gw.info["url"], body, headers={"x-ringserve-tag-user": user})
            seen[user].add(int(reply["model_version"]))
        for user, versions in seen.items():
            assert versions == {choose(route, user)}, (user, versions)
        assert set().union(*seen.values()) == {3, 4}  # ten users over a 50/50 split reach both versions
    finally:
        assert admin.route("mlp", clear=True)["ok"]
