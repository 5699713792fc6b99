"""The gateway's per-request shortcuts decide what the long way would: a model's signatures are
learned again only when the request's plan or the response's header is a different object, and
the one-lock count of a successful inference equals its two separate counts."""
from __future__ import annotations

import numpy as np
import pytest

from ringserve.gateway.metrics import GatewayMetrics
from ringserve.gateway.models import ModelBook, ModelView

pytestmark = pytest.mark.timeout(30)


def test_learning_is_skipped_only_for_the_same_plan_and_header_objects():
    book = ModelBook(None)
    book.models["m"] = ModelView(versions={1})
    plan, head = object(), b"head"
    x, y = {"x": np.zeros((1, 4), np.float32)}, {"y": np.zeros((1, 2), np.float32)}
    book.learn("m", x, y, (plan, head))
    assert book.models["m"].inputs == {"x": ("FP32", [-1, 4])}
    book.models["m"].inputs.clear()
    book.learn("m", x, y, (plan, head))  # the same objects: nothing new, nothing learned
    assert book.models["m"].inputs == {}
    book.learn("m", {"x": np.zeros((1, 8), np.float32)}, y, (object(), head))  # another plan: learned
    assert book.models["m"].inputs == {"x": ("FP32", [-1, 8])}
    book.learn("m", x, {"y": np.zeros((1, 3), np.int64)}, None)  # no key: always learned
    assert book.models["m"].outputs == {"y": ("INT64", [-1, -1])}
    book.models["m"] = ModelView(versions={1})  # the model came back: its view learns again
    book.learn("m", x, y, (plan, head))
    assert book.models["m"].inputs == {"x": ("FP32", [-1, 4])}


def test_one_lock_count_equals_the_two_counts():
    one, two = GatewayMetrics(), GatewayMetrics()
    for seconds, rows in [(0.0004, 1), (0.03, 4), (7.0, 2)]:
        one.infer_answered("mlp", "1", seconds, rows, "infer")
        two.infer_done("mlp", "1", seconds, rows, None)
        two.request("infer", 200)

    def samples(m):
        return sorted((f.name, tuple(sorted(s.labels.items())), s.value) for f in m.collect() for s in f.samples)

    assert samples(one) == samples(two)


def test_binary_answers_from_the_raw_buffers_are_the_bytes_the_arrays_give():
    """Through the HTTP server and the app, the master's answer faked as the client hands it over
    (checked buffers, no arrays): the first answer of a form is built from the arrays, the next
    ones from the buffers (client Reply.raw), and every response is the same bytes but for the
    request id; a new output shape is learned by the model's signatures."""
    import asyncio
    import os
    import re
    import time

    import orjson

    from ringserve.client.reply import Reply
    from ringserve.gateway import oip
    from ringserve.gateway.accesslog import AccessLog, BufferedLines
    from ringserve.gateway.app import AppConfig, GatewayApp
    from ringserve.gateway.http11 import Http11Protocol, HttpServer

    oip._heads.clear()
    oip._raw_heads.clear()
    shapes = [[1, 10], [1, 10], [1, 10], [2, 10], [2, 10]]
    made = []

    class Client:
        def __init__(self, loop):
            self.loop, self.n = loop, 0

        def submit(self, model, inputs, timeout=None, version=None, request_id=None, tags=None):
            shape = shapes[self.n]
            self.n += 1
            arr = np.arange(shape[0] * 10, dtype=np.float32).reshape(shape) + self.n
            made.append(arr)
            reply = Reply(request_id, None, 1, "w", {}, [["logits", "float32", shape, arr.tobytes()]], ())
            fut = self.loop.create_future()
            self.loop.call_soon(fut.set_result, reply)
            return fut

        def close(self):
            pass

    class Transport:
        def __init__(self):
            self.out = []

        def write(self, data):
            self.out.append(bytes(data))

        def is_closing(self):
            return False

        def close(self):
            raise AssertionError("the connection must stay open")

        def get_extra_info(self, name, default=None):
            return default

    async def main():
        loop = asyncio.get_running_loop()
        book = ModelBook(None)
        book.models["mlp"] = ModelView(versions={1}, ready_versions={1})
        book.ready_workers, book.last_ok = 1, time.monotonic() + 1e9
        app = GatewayApp("tcp://127.0.0.1:1", book, AppConfig(), None, GatewayMetrics(),
                         client_factory=lambda address: Client(loop),
                         access=AccessLog(BufferedLines(open(os.devnull, "w"))))
        proto = Http11Protocol(HttpServer(app), loop)
        transport = Transport()
        proto.connection_made(transport)
        x = np.zeros((1, 256), np.float32)
        head = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "parameters": {"binary_data_output": True}})
        body = head + x.tobytes()
        req = (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nInference-Header-Content-Length: %d\r\n"
               b"Content-Length: %d\r\n\r\n" % (len(head), len(body))) + body
        for _ in shapes:
            proto.data_received(req)
            for _ in range(20):
                await asyncio.sleep(0)
        return transport.out, book, app

    out, book, app = asyncio.run(asyncio.wait_for(main(), 20))
    assert len(out) == len(shapes)
    for k, (response, arr) in enumerate(zip(out, made, strict=True)):
        head_part, _, body = response.partition(b"\r\n\r\n")
        assert head_part.startswith(b"HTTP/1.1 200 OK\r\n")
        hlen = int(re.search(rb"inference-header-content-length: (\d+)", head_part).group(1))
        assert int(re.search(rb"\ncontent-length: (\d+)", head_part).group(1)) == len(body)
        header = orjson.loads(body[:hlen])
        assert header == {"model_name": "mlp", "model_version": "1", "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": list(arr.shape),
             "parameters": {"binary_data_size": arr.nbytes}}]}, k
        assert body[hlen:] == arr.tobytes(), k
    assert len(oip._raw_heads) == 2  # one form per output shape
    assert book.models["mlp"].outputs == {"logits": ("FP32", [-1, 10])}
    assert book.models["mlp"].inputs == {"x": ("FP32", [-1, 256])}
