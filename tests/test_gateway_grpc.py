"""The gateway's OIP gRPC service, spoken to by `tritonclient.grpc` (a client nobody here wrote),
against a real cluster: health, metadata, raw and typed tensors, a pinned version, error codes."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2  # noqa: E402  (Triton's superset of the OIP messages)
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402

from conftest import Cluster  # noqa: E402
from helpers import expected, mlp_state  # noqa: E402
from test_gateway import start_workers_side_by_side  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("gateway-grpc"))
    try:
        c.start_master("--max-queue", "2", "--max-attempts", "1")
        start_workers_side_by_side(c, [
            ("main", ["--model", "mlp=ringserve.worker.demo:mlp", "--model", "echo=tests.gateway_models:echo_all"]),
            ("slow", ["--credit", "1", "--model", "slow=ringserve.worker.demo:slow,arg.delay=0.3"])])
        gw = RoleProcess("ringserve.launch.gateway", ["--master", c.frontend, "--admin", c.admin, "--listen",
                                                      "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0",
                                                      "--status-interval", "0.2"], c.tmp / "gateway.log",
                         wait_ready=False)
        c.procs.append(gw)
        gw.wait_ready(60)
        client = tritongrpc.InferenceServerClient(gw.info["grpc"])
        wait_until(lambda: client.is_server_ready(), 30, what="gateway ready")
        yield c, gw, client
        client.close()
    finally:
        c.stop_all()


def tensor(name: str, arr: np.ndarray):
    i = tritongrpc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    i.set_data_from_numpy(arr)
    return i


def status_of(fn) -> str:
    with pytest.raises(InferenceServerException) as err:
        fn()
    return err.value.status()


def test_health_and_metadata(env):
    _, _, client = env
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "ringserve"
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "0")
    assert status_of(lambda: client.is_model_ready("nope")) == "StatusCode.NOT_FOUND"
    client.infer("mlp", [tensor("x", np.ones((1, 256), np.float32))])
    meta = client.get_model_metadata("mlp")
    assert meta.versions == ["0"] and meta.inputs[0].name == "x" and list(meta.inputs[0].shape) == [-1, 256]
    assert list(meta.outputs[0].shape) == [-1, 10]


def test_infer_equals_the_model_in_process_and_pinned_version(env):
    _, _, client = env
    x = np.random.default_rng(2).standard_normal((3, 256)).astype(np.float32)
    result = client.infer("mlp", [tensor("x", x)], request_id="g-1", model_version="0",
                          outputs=[tritongrpc.InferRequestedOutput("logits")])
    np.testing.assert_allclose(result.as_numpy("logits"), expected(mlp_state(0), x), rtol=1e-5, atol=1e-6)
    assert result.get_response().id == "g-1" and result.get_response().model_version == "0"
    assert status_of(lambda: client.infer("mlp", [tensor("x", x)], model_version="4")) == "StatusCode.NOT_FOUND"


def test_every_datatype_raw(env):
    _, _, client = env
    arrays = {n: (np.arange(6).reshape(2, 3) % (2 if n == "bool" else 100)).astype(n)
              for n in ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")}
    result = client.infer("echo", [tensor(k, v) for k, v in arrays.items()])
    for k, v in arrays.items():
        want = v.astype(np.float32) if v.dtype.kind == "f" else v
        np.testing.assert_array_equal(result.as_numpy(f"{k}_out"), want)
        assert result.as_numpy(f"{k}_out").dtype == want.dtype


def test_typed_contents_and_bad_requests(env):
    _, gw, client = env
    stub = client._client_stub  # tritonclient's own stub: a request with typed contents, as some clients send
    req = service_pb2.ModelInferRequest(model_name="echo")
    t = req.inputs.add(name="a", datatype="INT32", shape=[2, 2])
    t.contents.int_contents.extend([1, 2, 3, 4])
    resp = stub.ModelInfer(req)
    assert np.frombuffer(resp.raw_output_contents[0], np.int32).tolist() == [1, 2, 3, 4]
    bad = service_pb2.ModelInferRequest(model_name="echo")
    t = bad.inputs.add(name="a", datatype="INT32", shape=[2, 3])
    t.contents.int_contents.extend([1, 2])
    with pytest.raises(Exception) as err:
        stub.ModelInfer(bad)
    assert "INVALID_ARGUMENT" in str(err.value) and "needs 6 elements" in str(err.value)
    strings = service_pb2.ModelInferRequest(model_name="echo")  # BYTES (issue 18): typed contents, any bytes
    t = strings.inputs.add(name="s", datatype="BYTES", shape=[3])
    t.contents.bytes_contents.extend([b"a", b"", b"\xff\x00"])
    reply = stub.ModelInfer(strings)
    assert reply.outputs[0].datatype == "BYTES" and reply.raw_output_contents[0] == b"".join(
        len(b).to_bytes(4, "little") + b for b in (b"a", b"", b"\xff\x00"))
    for datatype in ("UINT32", "BF16"):
        bad = service_pb2.ModelInferRequest(model_name="echo", raw_input_contents=[b"\0" * 4])
        bad.inputs.add(name="a", datatype=datatype, shape=[1])
        with pytest.raises(Exception) as err:
            stub.ModelInfer(bad)
        assert "INVALID_ARGUMENT" in str(err.value)
    assert status_of(lambda: client.infer("mlp", [tensor("x", np.ones((1, 3), np.float32))])) == \
        "StatusCode.INVALID_ARGUMENT"
    assert status_of(lambda: client.infer("nope", [tensor("x", np.ones((1, 3), np.float32))])) == \
        "StatusCode.NOT_FOUND"
    assert client.is_server_live()


def test_overload_and_timeout_codes(env):
    from ringserve.client.admin import AdminClient

    c, _, client = env
    x = np.ones((1, 2), np.float32)
    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda _: _code(lambda: client.infer("slow", [tensor("x", x)])), range(10)))
    assert "OK" in codes and "StatusCode.RESOURCE_EXHAUSTED" in codes, codes
    admin = AdminClient(c.admin)  # the slow worker finishes what it took (was a fixed 1.5 s sleep)
    wait_until(lambda: admin.status()["books"]["pending"] == 0, 20, 0.05, "every slow request answered")
    assert status_of(lambda: client.infer("slow", [tensor("x", x)], timeout=50_000)) == "StatusCode.DEADLINE_EXCEEDED"


def _code(fn) -> str:
    try:
        fn()
        return "OK"
    except InferenceServerException as exc:
        return exc.status()
