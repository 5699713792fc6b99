"""Issue 22 (fourth round): the worker's socket thread passes on what the compute thread handed over
(worker/handoff.py: one message per batch, the headers already packed) to a real master socket, in
the framing that master reads: the same replies, headers byte for byte and tensor frames, whether
the master reads framing 2 (a turn's parts joined into one header list) or framing 1 (one frame
per header), and every answer counted off the credit it held."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zmq

from ringserve.protocol.codec import encode_tensors, pack, unpack_map
from ringserve.protocol.envelope import split_replies
from ringserve.protocol.messages import REPLY, WORKER_PROTO, ErrorCode, error_body
from ringserve.protocol.sockets import drain
from ringserve.worker.agent import WorkerAgent, WorkerConfig
from ringserve.worker.handoff import result_frames
from ringserve.worker.loader import ServedModel, parse_model_arg
from ringserve.worker.metrics import LATENCY_BUCKETS, WorkerMetrics

from helpers import noop_agent_and_master

pytestmark = pytest.mark.timeout(60)


def _reply(i: int, big: bool) -> tuple[dict, list]:
    out = np.full((1, 8192 if big else 4), i, np.float32)  # 32 KiB: out of line; 16 bytes: inline
    meta, frames = encode_tensors({"y": out})
    return {"id": f"c{i}", "key": f"k{i}", "attempt": 1, "ok": True, "model": "noop", "version": 1,
            "outputs": meta}, frames


@pytest.mark.parametrize("framing", [1, 2])
def test_handed_over_replies_reach_the_master_whole_in_its_framing(framing):
    with noop_agent_and_master() as (agent, master):
        push = agent.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        try:
            link = agent.links[0]
            link.framing = framing
            batches = [[_reply(0, False), _reply(1, True)], [_reply(2, False)],
                       [(error_body("c3", ErrorCode.TIMEOUT, "late", key="k3", attempt=1), [])]]
            agent.in_flight = link.in_flight = 4
            push.connect(agent.results_ep)
            for replies in batches:  # three parts in one turn, as the compute and stage threads send them
                push.send_multipart(result_frames(0, replies), copy=False)
            got = 0
            for _ in range(100):  # bounded: the inproc pipe delivers at once
                if got == len(batches) or not agent.results.poll(100):
                    break
                before = len(link.replies)
                drain(agent.results, agent.on_result, 16)
                got += len(link.replies) - before
            assert got == len(batches) and agent.in_flight == 0 and link.in_flight == 0
            agent.flush_replies()
            assert master.poll(5000)
            frames = master.recv_multipart()
            assert frames[1:3] == [WORKER_PROTO, REPLY]
            body = frames[3:]
            expected = [(pack(h), [bytes(f) for f in fs]) for replies in batches for h, fs in replies]
            if framing == 1:  # one frame per header, each followed by its own tensor frames
                assert body == [f for raw, fs in expected for f in (raw, *fs)]
            else:  # one header list, then every tensor frame in order
                assert len(body) == 1 + sum(len(fs) for _, fs in expected)
            split = split_replies(body)
            assert [(bytes(raw), [bytes(f) for f in fs]) for raw, _, fs in split] == expected
            assert [unpack_map(raw)["id"] for raw, _ in expected] == ["c0", "c1", "c2", "c3"]
            assert not master.poll(200)  # one REPLY for the whole turn
        finally:
            push.close(linger=0)


def test_queue_waits_counted_per_batch_export_as_the_same_histogram():
    """The queue-wait histogram is observed a batch at a time (worker/metrics.py BatchHistogram):
    a scrape reads exactly what prometheus_client's Histogram reads for the same values."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    waits = [[0.0001, 0.003, 7.0], [0.0], [0.05, 0.0049, 2.5, 1e-6]]
    mine = WorkerMetrics()
    ref = CollectorRegistry()
    hist = Histogram("ringserve_worker_queue_duration_seconds", "Arrival at the worker to the start of its batch",
                     ["model"], buckets=LATENCY_BUCKETS, registry=ref)
    for batch in waits:
        mine.on_batch("mlp", len(batch), batch, 0.01)
        for w in batch:
            hist.labels("mlp").observe(w)
    mine.on_batch("other", 1, [0.2], 0.01)
    hist.labels("other").observe(0.2)
    def lines(text: str, sums: bool) -> list[str]:
        return sorted(ln for ln in text.splitlines()
                      if "queue_duration" in ln and "_created" not in ln and ("_sum{" in ln) == sums)

    got, want = generate_latest(mine.registry).decode(), generate_latest(ref).decode()
    assert lines(got, False) == lines(want, False) and len(lines(got, False)) > 30  # buckets, counts, HELP, TYPE
    # sums: the same values added in another order (a batch's total, then the running sum)
    assert [float(ln.split()[-1]) for ln in lines(got, True)] == pytest.approx(
        [float(ln.split()[-1]) for ln in lines(want, True)])


def test_an_input_signature_is_checked_once_and_a_bad_input_is_never_remembered_as_good():
    """The socket thread asks check_inputs once per (model, names, dtypes, shapes): a second request
    with the same signature gets the same rows, any other signature is checked in full (a bad one
    refused every time), and the memo stays bounded whatever shapes clients send."""
    from ringserve.worker.agent import MAX_CHECKED
    from ringserve.worker.batching import signature
    from ringserve.worker.loader import BadInput

    mlp = ServedModel(parse_model_arg("mlp=ringserve.worker.demo:mlp"), torch.device("cpu"))
    ragged = ServedModel(parse_model_arg("seq=ringserve.worker.demo:seq_encoder"), torch.device("cpu"))  # max_len 128
    agent = WorkerAgent(WorkerConfig(master="tcp://127.0.0.1:1"), {"mlp": mlp, "seq": ragged})
    try:
        good = {"x": np.zeros((3, 256), np.float32)}
        assert agent._check_inputs(mlp, good) == (3, signature(good)) and agent._check_inputs(mlp, good)[0] == 3
        for bad, why in (({"x": np.zeros((3, 256), np.float64)}, "dtype"), ({"x": np.zeros((3, 255), np.float32)}, "shape"),
                         ({"y": np.zeros((3, 256), np.float32)}, "takes inputs"), ({"x": np.zeros((0, 256), np.float32)}, "zero rows")):
            for _ in range(2):  # refused, and refused again: a failure is not remembered
                with pytest.raises(BadInput, match=why):
                    agent._check_inputs(mlp, bad)
        ids = lambda n: {"input_ids": np.ones((1, n), np.int64)}  # noqa: E731  (the mask is optional)
        assert agent._check_inputs(ragged, ids(128)) == (1, None) and agent._check_inputs(ragged, ids(7)) == (1, None)
        for _ in range(2):
            with pytest.raises(BadInput, match="beyond this model's maximum"):
                agent._check_inputs(ragged, ids(129))
        for n in range(1, 3 * MAX_CHECKED):  # signatures without end: the memo never grows past its bound
            agent._check_inputs(mlp, {"x": np.zeros((n, 256), np.float32)})
            assert len(agent.checked) <= MAX_CHECKED
        assert agent._check_inputs(mlp, good)[0] == 3
    finally:
        agent.results.close(linger=0)
        agent.ctx.term()
