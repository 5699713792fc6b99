"""The compute thread's answers through ReadyAnswers (worker/handoff.py): every part put is taken
exactly once and in order, one WAKE frame stands for however many parts wait, and a part put after
the socket thread's take always brings a WAKE of its own (so no answer waits for a wake that never
comes). The headers are the bytes a RESULT message carries, so both hand-overs read the same."""
from __future__ import annotations

import threading

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from ringserve.protocol.codec import pack, unpack
from ringserve.worker.handoff import WAKE, ReadyAnswers, result_frames

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pipe():
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for s in (pull, push):
        s.setsockopt(zmq.LINGER, 0)
    pull.bind("inproc://ready-answers")
    push.connect("inproc://ready-answers")
    try:
        yield push, pull
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()


def _wakes(pull: zmq.Socket) -> int:
    n = 0
    while pull.poll(0):
        assert pull.recv_multipart() == [WAKE]
        n += 1
    return n


def test_headers_are_the_result_message_s_and_one_wake_covers_several_parts(pipe):
    push, pull = pipe
    ready = ReadyAnswers()
    a = [({"key": "k1", "ok": True}, []), (pack({"key": "k2", "ok": True}), [b"data"])]
    b = [({"key": "k3", "ok": False}, [])]
    ready.put(0, a, push)
    ready.put(1, b, push)
    assert pull.poll(2000) and _wakes(pull) == 1  # the second put found a WAKE on its way
    parts = ready.take()
    assert [(link, count) for link, count, _, _ in parts] == [(0, 2), (1, 1)]
    assert parts[0][2] == result_frames(0, a)[3] and parts[0][3] == [b"data"]
    assert [h["key"] for h in map(unpack, unpack(parts[1][2]))] == ["k3"]
    assert ready.take() == [] and _wakes(pull) == 0
    ready.put(0, b, push)  # after a take, a put wakes the socket thread again
    assert pull.poll(2000) and _wakes(pull) == 1 and len(ready.take()) == 1


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 4), st.just(0)), max_size=40))
def test_any_order_of_puts_and_takes_loses_nothing_and_never_strands_a_part(steps):
    """0: the socket thread takes (as on a WAKE); n > 0: the compute thread puts a part of n answers.
    Invariant: while parts wait, a WAKE sent since the last take is pending."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        pull.bind("inproc://ready-prop")
        push.connect("inproc://ready-prop")
        ready, put, taken, pending = ReadyAnswers(), [], [], 0
        for i, n in enumerate(steps):
            if n:
                replies = [({"key": f"{i}.{j}"}, []) for j in range(n)]
                ready.put(i % 2, replies, push)
                put.append((i % 2, n))
            else:
                pending = 0
                taken += [(link, count) for link, count, _, _ in ready.take()]
            while pull.poll(0):
                pull.recv_multipart()
                pending += 1
            assert not ready.parts or pending >= 1
        taken += [(link, count) for link, count, _, _ in ready.take()]
        assert taken == put
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()


def test_two_threads_every_part_arrives_once(pipe):
    """A producer thread (the compute thread's side) and this thread taking on each WAKE, as the
    socket thread does: all 2,000 parts arrive, once each, in order."""
    push, pull = pipe
    ready, total = ReadyAnswers(), 2000

    def produce():
        for i in range(total):
            ready.put(0, [({"key": str(i)}, [])], push)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    got = []
    for _ in range(100_000):  # bounded: each turn waits at most 0.1 s
        if len(got) == total:
            break
        if pull.poll(100):
            pull.recv_multipart()
            got += [unpack(unpack(headers)[0])["key"] for _, _, headers, _ in ready.take()]
    t.join(10)
    got += [unpack(unpack(headers)[0])["key"] for _, _, headers, _ in ready.take()]
    assert got == [str(i) for i in range(total)]
