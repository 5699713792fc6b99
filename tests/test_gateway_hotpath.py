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
