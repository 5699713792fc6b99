"""The master's books after the seventh round's second pass (issue 22): `ModelQueues.push_new` is
`full` then `push` in one call, and `AnsweredCache.add`'s one-lookup form keeps the order, the
bounds and the remembered fields of the two-step form. Both are checked against a reference on
random operation sequences (hypothesis), in process: no sockets."""
from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from ringserve.master.registry import AnsweredCache, ModelQueues, PendingRequest


def _req(key: str, model: str, version) -> PendingRequest:
    return PendingRequest(key, "r" + key, b"c", model.encode(), model, version, b"h", [], 1.0, 0.0)


def _snapshot(q: ModelQueues) -> dict:
    return {m: {pin: [(k, r.seq) for k, r in fifo.items()] for pin, fifo in pins.items()}
            for m, pins in q._queues.items()} | {"depth": dict(q._depth)}


ops = st.lists(st.tuples(st.sampled_from(["push", "pop", "remove"]), st.sampled_from(["a", "b"]),
                         st.sampled_from([None, 1, 2, 3]), st.sampled_from([None, 1, 2, 3]),
                         st.integers(0, 3)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(0, 4), st.integers(0, 3))
def test_push_new_is_full_then_push(seq, max_queue, max_pins):
    new, old = ModelQueues(max_queue, max_pins), ModelQueues(max_queue, max_pins)
    held: list[tuple[PendingRequest, PendingRequest]] = []
    for i, (op, model, pin, version, n) in enumerate(seq):
        if op == "push":
            a, b = _req(str(i), model, version), _req(str(i), model, version)
            room = not old.full(model, pin)
            if room:
                old.push(b)
            assert new.push_new(a, pin) is room
            if room:
                held.append((a, b))
        elif op == "pop":
            got_new = new.pop_front(model, version, n)
            got_old = old.pop_front(model, version, n)
            assert [r.key for r in got_new] == [r.key for r in got_old]
            gone = {r.key for r in got_new}
            held = [(a, b) for a, b in held if a.key not in gone]
        elif held:
            a, b = held.pop(n % len(held))
            new.remove(a)
            old.remove(b)
        assert _snapshot(new) == _snapshot(old)
        for m in ("a", "b"):
            assert new.depth(m) == old.depth(m)
            for p in (None, 1, 2, 3):
                assert new.full(m, p) == old.full(m, p)


class _TwoStepCache(AnsweredCache):
    """The form before this pass: a membership test, then a store of a list entry."""

    def add(self, cid, model, body, delivered_to=None, nbytes=None):
        ids, replies = self._ids, self._replies
        if cid in ids:
            ids.move_to_end(cid)
            self._drop_reply(cid)
        ids[cid] = [model, delivered_to]
        size = (len(b"".join(body)) if nbytes is None else nbytes) + len(cid[0]) + len(cid[1]) + 64
        if size <= self.max_bytes:
            replies[cid] = (body, size)
            self.bytes += size
        while self.bytes > self.max_bytes and replies:
            self.bytes -= replies.popitem(last=False)[1][1]
        while len(ids) > self.max_ids:
            old, _ = ids.popitem(last=False)
            self._drop_reply(old)

    def resent_to(self, cid, ident):
        entry = self._ids.get(cid)
        if entry is not None:
            entry[1] = ident


cache_ops = st.lists(st.tuples(st.sampled_from(["add", "add", "resend"]), st.sampled_from(["s1", "s2"]),
                               st.integers(0, 6), st.sampled_from(["m", "n"]), st.integers(0, 200),
                               st.sampled_from([None, b"x", b"y"])), max_size=80)


@settings(max_examples=300, deadline=None)
@given(cache_ops, st.integers(1, 6), st.integers(0, 900))
def test_answered_cache_add_keeps_order_bounds_and_fields(seq, max_ids, max_bytes):
    new, old = AnsweredCache(max_ids, max_bytes), _TwoStepCache(max_ids, max_bytes)
    for op, scope, n, model, size, to in seq:
        cid = (scope, f"r{n}")
        if op == "add":
            body = [b"svc", b"h" * size]
            new.add(cid, model, body, to, 3 + size)
            old.add(cid, model, body, to, 3 + size)
        else:
            new.resent_to(cid, b"z")
            old.resent_to(cid, b"z")
        assert list(new._ids) == list(old._ids)
        assert list(new._replies) == list(old._replies)
        assert new.bytes == old.bytes <= max_bytes
        assert len(new) == len(old) <= max_ids
        for c in old._ids:
            assert new.model(c) == old.model(c) and new.delivered_to(c) == old.delivered_to(c)
            assert new.reply(c) == old.reply(c) and (c in new)
        assert isinstance(new._ids, OrderedDict)
