"""ringserve-gateway against a real cluster, spoken to by clients nobody here wrote.

`tritonclient.http` (JSON and binary tensors), `curl` for the JSON path, and raw sockets for
bodies no client would send. One cluster for the module: a master (small queues, one attempt
per request), a worker serving the demo MLP, an echo model for every datatype, a model whose
outputs the wire cannot carry, and two slow workers for overload, timeouts and a lost worker.
"""
from __future__ import annotations

import gzip
import json
import shutil
import socket
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import Cluster  # noqa: E402
from helpers import expected, mlp_state  # noqa: E402
from ringserve.client.admin import AdminClient  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def start_gateway(cluster: Cluster, *args: str, label: str = "gateway") -> RoleProcess:
    gw = RoleProcess("ringserve.launch.gateway", ["--master", cluster.frontend, "--admin", cluster.admin,
                                                  "--listen", "127.0.0.1:0", "--status-interval", "0.2", *args],
                     cluster.tmp / f"{label}-{len(cluster.procs)}.log", wait_ready=False)
    cluster.procs.append(gw)
    gw.wait_ready(60)
    return gw


def start_workers_side_by_side(cluster: Cluster, specs: list[tuple[str, list[str]]]) -> None:
    """Start one worker per (name, args) at once and wait for each (Cluster.start_workers waits for
    one before starting the next); then wait until the master lists them all."""
    from ringserve.launch.procs import wait_for_workers

    started = [cluster._start("ringserve.launch.worker", ["--master", cluster.master.info["backend"], "--name", name,
                                                          "--threads", "1", "--heartbeat-interval", "0.2", *args],
                              name, wait_ready=False) for name, args in specs]
    for p in started:
        p.wait_ready(90)
    cluster.workers += started
    wait_for_workers(cluster.admin, len(cluster.workers), timeout=60)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("gateway"))
    try:
        c.start_master("--max-queue", "2", "--max-attempts", "1")
        start_workers_side_by_side(c, [
            ("main", ["--model", "mlp=ringserve.worker.demo:mlp", "--model", "echo=tests.gateway_models:echo_all",
                      "--model", "complex=ringserve.worker.demo:complex_out"]),
            ("slow", ["--credit", "1", "--model", "slow=ringserve.worker.demo:slow,arg.delay=0.3"]),
            ("doomed", ["--credit", "1", "--model", "doomed=ringserve.worker.demo:slow,arg.delay=5"])])
        gw = start_gateway(c, "--metrics-port", "0")
        host_port = gw.info["url"].removeprefix("http://")
        client = tritonhttp.InferenceServerClient(host_port, concurrency=4, network_timeout=30)
        wait_until(lambda: client.is_server_ready(), 30, what="gateway ready")
        yield c, gw, client
        client.close()
    finally:
        c.stop_all()


def post(url: str, body: bytes, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def infer_json(model: str, inputs: list, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def mlp_input(rows: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32)


# ------------------------------------------------------------------ health and metadata
def test_health_and_server_metadata(env):
    _, gw, client = env
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "ringserve" and "binary_tensor_data" in meta["extensions"]
    status, _, body = get(gw.info["url"] + "/v2/health/ready")
    assert status == 200 and json.loads(body) == {"ready": True}


def test_model_metadata_and_ready(env):
    _, gw, client = env
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "0")
    assert not client.is_model_ready("mlp", "9") and not client.is_model_ready("nope")
    client.infer("mlp", [_triton_input("x", mlp_input(2))])  # the signature is learned from traffic
    meta = client.get_model_metadata("mlp")
    assert meta["name"] == "mlp" and meta["versions"] == ["0"] and meta["platform"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 256]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("mlp", "0")["name"] == "mlp"
    for model, version in (("nope", ""), ("mlp", "7"), ("mlp", "abc")):
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata(model, version)
        assert err.value.status() == "404"


# ------------------------------------------------------------------ inference
def _triton_input(name: str, arr: np.ndarray, binary: bool = True):
    from tritonclient.utils import np_to_triton_dtype

    i = tritonhttp.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    i.set_data_from_numpy(arr, binary_data=binary)
    return i


@pytest.mark.parametrize("binary_in,binary_out", [(False, False), (True, True), (True, False), (False, True)])
def test_tritonclient_infer_equals_the_model_in_process(env, binary_in, binary_out):
    _, _, client = env
    x = mlp_input(4, seed=int(binary_in) * 2 + int(binary_out))
    out = tritonhttp.InferRequestedOutput("logits", binary_data=binary_out)
    result = client.infer("mlp", [_triton_input("x", x, binary_in)], outputs=[out], request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("logits"), expected(mlp_state(0), x), rtol=1e-5, atol=1e-6)
    resp = result.get_response()
    assert resp["id"] == "req-7" and resp["model_name"] == "mlp" and resp["model_version"] == "0"


def test_default_outputs_are_binary_and_pinned_version(env):
    _, _, client = env
    x = mlp_input(2, seed=5)
    result = client.infer("mlp", [_triton_input("x", x)], model_version="0")  # no outputs: binary_data_output
    np.testing.assert_allclose(result.as_numpy("logits"), expected(mlp_state(0), x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceServerException) as err:
        client.infer("mlp", [_triton_input("x", x)], model_version="3")
    assert err.value.status() == "404" and "UNKNOWN_VERSION" in err.value.message()


DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
             "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


@pytest.mark.parametrize("binary", [False, True])
def test_every_datatype_ringserve_carries(env, binary):
    _, _, client = env
    rng = np.random.default_rng(1)
    arrays = {dt.lower(): (rng.integers(0, 2, (2, 3)) if dt == "BOOL" else rng.integers(-50, 100, (2, 3)))
              .astype(np_dt) for dt, np_dt in DATATYPES.items()}
    arrays["uint8"] = arrays["uint8"] % 100
    result = client.infer("echo", [_triton_input(k, v, binary) for k, v in arrays.items()])
    for k, v in arrays.items():
        got = result.as_numpy(f"{k}_out")
        # the worker runs floating inputs in the served dtype (float32); integers and bools are untouched
        want = v.astype(np.float32) if v.dtype.kind == "f" else v
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_round_trip_json_and_binary(env, binary):
    """Issue 18: BYTES through the gateway: empty strings, non-UTF-8 bytes (binary), a 1 MB string."""
    _, _, client = env
    items = [b"hello", b"", "h\u00e9llo".encode(), b"x" * (1 << 20)] + ([b"\xff\xfe\x00"] if binary else [])
    arr = np.empty((1, len(items)), dtype=object)
    arr[0, :] = items
    out = tritonhttp.InferRequestedOutput("s_out", binary_data=binary)
    got = client.infer("echo", [_triton_input("s", arr, binary)], outputs=[out]).as_numpy("s_out")
    assert got.shape == arr.shape  # tritonclient gives JSON strings back as str, binary ones as bytes
    assert [b if isinstance(b, bytes) else b.encode() for b in got.reshape(-1)] == items


def test_bytes_that_are_not_utf8_come_back_as_binary_even_when_json_was_asked(env):
    _, gw, _ = env
    body = b'{"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}}], ' \
           b'"outputs": [{"name": "s_out", "parameters": {"binary_data": false}}]}'
    head_len = len(body)
    status, headers, raw = post(f"{gw.info['url']}/v2/models/echo/infer", body + (3).to_bytes(4, "little") + b"\xff\xfe\x00",
                                {"Inference-Header-Content-Length": str(head_len),
                                 "Content-Type": "application/octet-stream"})
    assert status == 200, raw[:300]
    n = int(headers.get("inference-header-content-length"))
    resp = __import__("json").loads(raw[:n])
    assert resp["outputs"][0]["datatype"] == "BYTES" and resp["outputs"][0]["parameters"]["binary_data_size"] == 7
    assert raw[n:] == (3).to_bytes(4, "little") + b"\xff\xfe\x00"


def test_nested_and_flat_json_data_outputs_selection_and_parameters(env):
    _, gw, _ = env
    url = gw.info["url"] + "/v2/models/echo/infer"
    nested = {"name": "a", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}
    flat = {"name": "b", "shape": [2, 2], "datatype": "FP32", "data": [1.5, 2.5, 3.5, 4.5]}
    status, headers, body = post(url, infer_json("echo", [nested, flat], id="x1", outputs=[{"name": "b_out"}],
                                                 parameters={"user": "u1", "n": 3}),
                                 {"Content-Type": "application/json"})
    assert status == 200, body
    resp = json.loads(body)
    assert resp["id"] == "x1" and [o["name"] for o in resp["outputs"]] == ["b_out"]
    assert resp["outputs"][0] == {"name": "b_out", "datatype": "FP32", "shape": [2, 2], "data": [1.5, 2.5, 3.5, 4.5]}
    status, _, body = post(url, infer_json("echo", [nested], outputs=[{"name": "nope"}]))
    assert status == 400 and "no output 'nope'" in json.loads(body)["error"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_json(env):
    _, gw, _ = env
    x = mlp_input(1, seed=9)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": x.tolist()}]})
    out = subprocess.run(["curl", "-s", "-f", "-H", "Content-Type: application/json", "-d", body,
                          gw.info["url"] + "/v2/models/mlp/infer"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    logits = json.loads(out.stdout)["outputs"][0]
    assert logits["shape"] == [1, 10]
    np.testing.assert_allclose(np.array(logits["data"], np.float32).reshape(1, 10), expected(mlp_state(0), x),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ error mapping
def test_error_mapping_bad_request_unknown_model_internal(env):
    _, gw, client = env
    with pytest.raises(InferenceServerException) as err:  # the worker's input check
        client.infer("mlp", [_triton_input("x", np.ones((1, 3), np.float32))])
    assert err.value.status() == "400" and "BAD_REQUEST" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("nope", [_triton_input("x", np.ones((1, 3), np.float32))])
    assert err.value.status() == "404" and "UNKNOWN_MODEL" in err.value.message()
    with pytest.raises(InferenceServerException) as err:  # complex outputs: the wire cannot carry them
        client.infer("complex", [_triton_input("x", np.ones((1, 3), np.float32))])
    assert err.value.status() == "500" and "INTERNAL" in err.value.message()


def test_overloaded_is_429_with_retry_after(env):
    _, gw, _ = env
    url = gw.info["url"] + "/v2/models/slow/infer"
    body = infer_json("slow", [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}])
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: post(url, body), range(12)))
    codes = [a[0] for a in answers]
    assert 200 in codes and 429 in codes, codes
    refused = next(a for a in answers if a[0] == 429)
    assert refused[1].get("retry-after") == "1" and "OVERLOADED" in json.loads(refused[2])["error"]


def test_timeout_is_504(env):
    _, gw, _ = env
    body = infer_json("slow", [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
                      parameters={"timeout": 50_000})  # Triton's timeout parameter: microseconds
    status, _, answer = post(gw.info["url"] + "/v2/models/slow/infer", body)
    assert status == 504 and "TIMEOUT" in json.loads(answer)["error"]


def test_worker_lost_is_503(env):
    c, gw, _ = env
    body = infer_json("doomed", [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}])
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(post, gw.info["url"] + "/v2/models/doomed/infer", body)
        admin = AdminClient(c.admin)  # the request is on the worker, sleeping (5 s; was a fixed 1 s sleep)
        wait_until(lambda: any(w["name"] == "doomed" and w["in_flight"] for w in admin.status()["workers"]), 20,
                   0.05, "the request on the doomed worker")
        doomed = next(w for w in c.workers if "doomed" in str(w.log_path))
        doomed.kill()
        status, headers, answer = fut.result(timeout=30)
    assert status == 503 and "WORKER_LOST" in json.loads(answer)["error"] and headers.get("retry-after")


# ------------------------------------------------------------------ bodies no client would send
def _binary(tensor: dict, tail: int, length: int | None = None) -> tuple[bytes, dict]:
    head = infer_json("mlp", [tensor])
    return head + b"\0" * tail, {"Inference-Header-Content-Length": str(len(head) if length is None else length)}


BAD_BODIES = [
    (b"{not json", {}, 400, "not valid JSON"),
    (b"[1, 2]", {}, 400, "JSON object"),
    (b"{}", {}, 400, "'inputs'"),
    (infer_json("mlp", [{"name": "x", "shape": [2, 256], "datatype": "FP32", "data": [1.0] * 3}]), {}, 400,
     "needs 512 elements"),
    (infer_json("mlp", [{"name": "x", "shape": [-1, 256], "datatype": "FP32", "data": [1.0]}]), {}, 400,
     "non-negative"),
    (infer_json("echo", [{"name": "s", "shape": [3], "datatype": "BYTES", "data": ["a"]}]), {}, 400,
     "needs 3 elements"),
    (infer_json("echo", [{"name": "s", "shape": [2], "datatype": "BYTES", "data": [1, 2]}]), {}, 400,
     "takes strings"),
    (infer_json("mlp", [{"name": "x", "shape": [1, 2], "datatype": "UINT32", "data": [1, 2]}]), {}, 400,
     "cannot be carried"),
    (infer_json("mlp", [{"name": "x", "shape": [1, 2], "datatype": "BF16", "data": [1, 2]}]), {}, 400,
     "cannot be carried"),
    (infer_json("mlp", [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": ["1", "2"]}]), {}, 400,
     "strings"),
    (infer_json("mlp", [{"name": "x", "shape": [1, 2], "datatype": "INT8", "data": [1, 300]}]), {}, 400,
     "out of range"),
    (infer_json("mlp", [{"name": "x", "shape": [1, 2], "datatype": "INT32", "data": [1.5, 2]}]), {}, 400,
     "fractional"),
    (infer_json("mlp", [{"name": "x", "shape": [3], "datatype": "FP32", "data": [[1, 2], [3]]}]), {}, 400,
     "rectangular"),
    (infer_json("mlp", [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}] * 2), {}, 400,
     "twice"),
    (infer_json("mlp", [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                         "parameters": {"binary_data_size": 2_000_000_000}}]), {}, 400, "runs past the end"),
    (*_binary({"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}, 8,
               length=99999), 400, "Inference-Header-Content-Length"),
    (*_binary({"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}, 4), 400,
     "needs 8 bytes"),
    (*_binary({"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}, 12), 400,
     "add up to 8"),
    (*_binary({"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}, 0, length=0), 400,
     "Inference-Header-Content-Length"),
    (b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}, 400, "gzip"),
    (b"{}", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
    (gzip.compress(b" " * (3 << 20), mtime=0), {"Content-Encoding": "gzip"}, 413, "limit"),
    (b"{" * 5000 + b"}" * 5000, {}, 400, None),
    (infer_json("mlp", [{"name": "x", "shape": [1, 20000], "datatype": "FP32", "data": [1.0] * 20000}]), {}, 413,
     "--max-json-bytes"),
]


@pytest.mark.parametrize("body,headers,status,text", BAD_BODIES)
def test_malformed_bodies_get_a_clear_4xx(env, body, headers, status, text):
    c, _, _ = env
    gw = _small_gateway(c)
    got, _, answer = post(gw.info["url"] + "/v2/models/mlp/infer", body, headers)
    assert got == status, answer
    error = json.loads(answer)["error"]
    assert text is None or text in error, error
    assert get(gw.info["url"] + "/v2/health/live")[0] == 200  # and it goes on serving


_SMALL: dict = {}


def _small_gateway(c: Cluster) -> RoleProcess:
    """A gateway with a 1 MiB body limit, shared by the malformed-body tests."""
    gw = _SMALL.get(id(c))
    if gw is None or not gw.alive():
        gw = _SMALL[id(c)] = start_gateway(c, "--max-body-bytes", str(1 << 20), "--max-json-bytes", str(64 << 10),
                                           "--body-timeout", "1", label="small")
    return gw


def test_oversized_claims_and_slow_bodies_never_hang(env):
    c, _, _ = env
    gw = _small_gateway(c)
    host, port = gw.info["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # claims 2 GB, sends nothing
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000000\r\n\r\n{")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # sends half its body, then stalls
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"inputs\"")
        assert s.recv(4096).startswith(b"HTTP/1.1 408")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # not HTTP at all
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        assert s.recv(4096)[:12] in (b"HTTP/1.1 400", b"")
    assert get(gw.info["url"] + "/v2/health/live")[0] == 200
    status, _, _ = get(gw.info["url"] + "/v2/models/mlp/infer")
    assert status == 405
    chunks = iter([b'{"inputs": [{"name": "x", "shape": [1, 256], ', b'"datatype": "FP32", "data": [',
                   b",".join([b"0.5"] * 256), b"]}]}"])  # chunked transfer: no Content-Length
    status, _, body = post(gw.info["url"] + "/v2/models/mlp/infer", chunks, {"Transfer-Encoding": "chunked"})
    assert status == 200 and json.loads(body)["outputs"][0]["shape"] == [1, 10]
    assert get(gw.info["url"] + "/nothing")[0] == 404


# ------------------------------------------------------------------ metrics
def test_metrics_named_as_triton(env):
    _, gw, client = env
    client.infer("mlp", [_triton_input("x", mlp_input(2))])
    text = urllib.request.urlopen(gw.info["metrics"], timeout=10).read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith('nv_inference_request_success_total{model="mlp"'))
    assert float(line.split()[-1]) >= 1
    assert "ringserve_gateway_request_seconds_bucket" in text and "nv_inference_request_failure_total" in text


def test_large_binary_tensors_round_trip(env):
    _, _, client = env
    x = np.random.default_rng(3).standard_normal((256, 1024)).astype(np.float32)  # 1 MiB each way
    result = client.infer("echo", [_triton_input("x", x)])
    np.testing.assert_array_equal(result.as_numpy("x_out"), x)


def _mutations(rng: np.random.Generator):
    """Requests near valid ones: paths, methods, headers and bodies broken one random way at a time."""
    x = np.ones((1, 256), np.float32)
    valid = json.loads(infer_json("mlp", [{"name": "x", "shape": [1, 256], "datatype": "FP32",
                                           "data": x.ravel().tolist()}], id="f"))
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 1024}}],
                       "parameters": {"binary_data_output": True}}).encode()
    junk = [None, True, -1, 2**70, 1.5, "", "x" * 300, [], {}, [[]], {"a": 1}, [1, "a"], "FP32"]
    paths = ["/v2/models/mlp/infer", "/v2/models/mlp/versions/0/infer", "/v2/models/echo/infer",
             "/v2/models/nope/infer", "/v2/models/mlp/versions/x/infer", "/v2/models//infer", "/v2/models/mlp",
             "/v2/models/mlp/ready", "/v2", "/v2/health/ready", "/v2/models", "/v2/models/mlp/versions",
             "/v2/models/%00/infer", "/v2/models/mlp/infer/extra", "/v3/models/mlp/infer"]
    for _ in range(300):
        path = paths[rng.integers(len(paths))]
        method = "POST" if rng.random() < 0.8 else ["GET", "PUT", "DELETE"][rng.integers(3)]
        headers: dict = {}
        kind = rng.integers(6)
        if kind == 0:  # one field replaced by junk
            body = json.loads(json.dumps(valid))
            target = body["inputs"][0] if rng.random() < 0.7 else body
            key = ["name", "shape", "datatype", "data", "parameters", "inputs", "outputs", "id"][rng.integers(8)]
            target[key] = junk[rng.integers(len(junk))]
            data = json.dumps(body).encode()
        elif kind == 1:  # truncated or flipped bytes of a valid body
            data = bytearray(json.dumps(valid).encode())
            for _ in range(rng.integers(1, 4)):
                data[rng.integers(len(data))] = rng.integers(256)
            data = bytes(data[: rng.integers(1, len(data) + 1)])
        elif kind == 2:  # binary body with a wrong header length or tail
            tail = x.tobytes()[: rng.integers(0, 1100)]
            data = head + tail
            headers["Inference-Header-Content-Length"] = str(int(rng.integers(-5, len(data) + 50)))
        elif kind == 3:  # random bytes
            data = rng.bytes(int(rng.integers(0, 2000)))
            if rng.random() < 0.3:
                headers["Content-Encoding"] = ["gzip", "deflate", "zstd"][rng.integers(3)]
        elif kind == 4:  # a valid binary request
            data = head + x.tobytes()
            headers["Inference-Header-Content-Length"] = str(len(head))
        else:  # shape/data disagreements
            body = json.loads(json.dumps(valid))
            body["inputs"][0]["shape"] = [int(d) for d in rng.integers(0, 300, rng.integers(0, 10))]
            data = json.dumps(body).encode()
        yield method, path, headers, data


def test_fuzz_rest_surface_never_5xx(env):
    """Seeded and bounded: 300 requests near valid ones over one keep-alive connection; every one gets
    a 2xx or 4xx with a JSON body (an 'error' for 4xx), and the gateway goes on serving."""
    import http.client

    _, gw, _ = env
    host, port = gw.info["url"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    seen = set()
    try:
        for method, path, headers, data in _mutations(np.random.default_rng(17)):
            conn.request(method, path, body=data if method != "GET" else None, headers=headers)
            r = conn.getresponse()
            body = r.read()
            seen.add(r.status)
            assert r.status < 500, (method, path, headers, data[:200], body[:300])
            length = r.getheader("inference-header-content-length")
            answer = json.loads(body[: int(length)] if length else body)
            assert r.status < 300 or isinstance(answer.get("error"), str)
            if r.getheader("connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
    finally:
        conn.close()
    assert 200 in seen and 400 in seen and 404 in seen
    assert get(gw.info["url"] + "/v2/health/live")[0] == 200
