"""Ragged (variable-length) batching: the pure policy (declaration, grouping by bucket, padding,
splitting) and a real worker serving a small transformer encoder to requests of mixed lengths,
whose answers must equal the model run alone on each request. Also the per-model batch limit
(a model that must never batch) and a model whose outputs are not one row per input row."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ringserve.client import BadRequest, Client
from ringserve.client.admin import AdminClient
from ringserve.launch.procs import wait_until
from ringserve.worker import demo
from ringserve.worker.batching import (Batcher, CostFit, ModelBatching, Ragged, WorkItem, choose_by_length,
                                       concat_inputs, ragged_from_spec,
                                       split_outputs)
from ringserve.worker.loader import BadInput, ModelLoadError, ServedModel, parse_model_arg

pytestmark = pytest.mark.timeout(120)

IDS = {"pad": 0, "mask": "mask", "buckets": [4, 8, 16]}
SPEC = {"ids": ((None, None), "int64", IDS), "mask": ((None, None), "int64"), "scale": ((None, 2), "float32")}


def ragged(**over) -> Ragged:
    return ragged_from_spec({**SPEC, "ids": ((None, None), "int64", {**IDS, **over})})


def req(rid: str, length: int, rows: int = 1, mask: bool = False, r: Ragged | None = None) -> WorkItem:
    inputs = {"ids": np.arange(1, rows * length + 1, dtype=np.int64).reshape(rows, length),
              "scale": np.full((rows, 2), float(length), np.float32)}
    if mask:
        inputs["mask"] = np.ones((rows, length), np.int64)
        inputs["mask"][:, -1] = 0  # the client padded its last token itself
    return WorkItem(rid, 1, "m", None, inputs, rows, 0.0, 99.0)


def test_the_declaration_is_read_and_checked():
    r = ragged()
    assert r.pads == {"ids": 0, "mask": 0} and r.mask == "mask" and r.buckets == (4, 8, 16) and r.max_len == 16
    assert [r.bucket(n) for n in (1, 4, 5, 16)] == [4, 4, 8, 16]
    assert ragged_from_spec({"x": ((None, 3), "float32")}) is None  # no options: not ragged
    assert ragged(max_len=12).max_len == 12
    bad = [({"pad": "x"}, "pad"), ({"buckets": [8, 4]}, "increasing"), ({"max_len": 32}, "beyond the last bucket"),
           ({"mask": "nope"}, "must name one of the inputs"), ({"padding": 0}, "unknown options"),
           ({"seq_outputs": "h"}, "list of output names")]
    for over, why in bad:
        with pytest.raises(ValueError, match=why):
            ragged_from_spec({**SPEC, "ids": ((None, None), "int64", {**IDS, **over})})
    with pytest.raises(ValueError, match="free dim 1"):
        ragged_from_spec({"ids": ((None, 7), "int64", {"pad": 0})})
    with pytest.raises(ValueError, match="differs"):
        ragged_from_spec({"a": ((None, None), "int64", {"pad": 0, "buckets": [8]}),
                          "b": ((None, None), "int64", {"pad": 0, "buckets": [16]})})


def test_requests_group_by_bucket_and_the_mask_is_built():
    r = ragged()
    b = Batcher(32, 0.0, {"m": ModelBatching(ragged=r)})
    for rid, length in (("a", 3), ("b", 7), ("c", 1), ("d", 8), ("e", 16), ("f", 4)):
        b.add(req(rid, length))
    batches = []
    for _ in range(10):
        batch, _ = b.next_batch(1.0)
        if not batch:
            break
        batches.append(sorted(i.rid for i in batch))
    assert sorted(batches) == [["a", "c", "f"], ["b", "d"], ["e"]]  # buckets 4, 8, 16
    item = req("g", 5)
    b.add(item)
    assert item.length == 5 and item.inputs["mask"].tolist() == [[1] * 5] and item.inputs["mask"].dtype == np.int64


def test_concat_pads_to_the_bucket_and_split_cuts_back():
    r = ragged()
    b = Batcher(32, 0.0, {"m": ModelBatching(ragged=r)})
    items = [req("a", 5, rows=2), req("b", 7, mask=True), req("c", 6, rows=1)]
    for i in items:
        b.add(i)
    batch, _ = b.next_batch(1.0)
    assert batch == items
    x = concat_inputs(batch)
    assert x["ids"].shape == (4, 8) and x["mask"].shape == (4, 8) and x["scale"].shape == (4, 2)
    assert x["ids"][0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0] and x["mask"][0].tolist() == [1] * 5 + [0] * 3
    assert x["mask"][2].tolist() == [1] * 6 + [0, 0]  # the client's own mask, padded with 0
    hidden = np.repeat(x["ids"][:, :, None].astype(np.float32), 3, axis=2)  # [rows, seq, 3]
    outs = split_outputs({"h": hidden, "pooled": hidden.sum(1), "wide": np.zeros((4, 8), np.float32)}, batch)
    for item, out in zip(items, outs):
        np.testing.assert_array_equal(out["h"][:, :, 0], item.inputs["ids"])  # cut to its own length
        assert out["pooled"].shape == (item.rows, 3)  # pooled: split by rows only
        assert out["wide"].shape == (item.rows, item.length)  # dim 1 == padded length: taken as the sequence axis
    declared = ragged(seq_outputs=["h"])  # declared: only "h" is cut, whatever the others' widths
    for i in items:
        i.ragged = declared
    outs = split_outputs({"h": hidden, "wide": np.zeros((4, 8), np.float32)}, items)
    assert [o["wide"].shape for o in outs] == [(2, 8), (1, 8), (1, 8)]
    with pytest.raises(ValueError, match="seq_outputs"):
        split_outputs({"h": hidden.sum(1)}, items)
    alone = split_outputs({"h": hidden[:2]}, items[:1])  # one request: cut too
    assert alone[0]["h"].shape == (2, 5, 3)


def test_without_buckets_a_batch_is_chosen_by_length_and_padded_to_its_longest():
    r = ragged_from_spec({"ids": ((None, None), "int64", {"pad": -1})})
    b = Batcher(32, 0.0, {"m": ModelBatching(ragged=r)})

    def add(rid, length, at=0.0):
        b.add(WorkItem(rid, 1, "m", None, {"ids": np.ones((1, length), np.int64)}, 1, at, 99.0))

    for rid, length in (("a", 3), ("b", 70), ("c", 1)):
        add(rid, length)
    # A call costs 32 padded tokens before any batch ran: "b" would pad two short rows to 70, so it waits.
    batch, _ = b.next_batch(1.0)
    x = concat_inputs(batch)
    assert [i.rid for i in batch] == ["c", "a"] and x["ids"].shape == (2, 3) and x["ids"][0, 1] == -1
    assert [i.rid for i in b.next_batch(1.0)[0]] == ["b"]
    # Calls that cost far more than tokens (a GPU, say): every length shares one batch.
    fit = b.costs["m"] = CostFit()
    for rows in range(1, 20):
        fit.observe(rows * 10, 0.010 + 1e-7 * rows * 10)  # 10 ms a call, 0.1 us a token
    assert 90_000 < fit.overhead_tokens() < 110_000
    for rid, length in (("a", 3), ("b", 70), ("c", 1)):
        add(rid, length)
    batch, _ = b.next_batch(1.0)
    assert len(batch) == 3 and concat_inputs(batch)["ids"].shape == (3, 70)


def test_the_batch_by_length_always_holds_the_oldest_and_fits_the_limit():
    r = ragged_from_spec({"ids": ((None, None), "int64", {"pad": 0})})
    items = [WorkItem(f"r{k}", 1, "m", None, {"ids": np.ones((1, n), np.int64)}, 1, float(k), 99.0)
             for k, n in enumerate([40, 5, 6, 7, 8, 41, 42, 9])]
    for item in items:
        item.ragged, item.length = r, item.inputs["ids"].shape[1]
    assert [i.length for i in choose_by_length(items, 32, 32.0)] == [40, 41, 42]  # 5..9 in another call: less padding
    assert [i.length for i in choose_by_length(items, 32, 1e5)] == [5, 6, 7, 8, 9, 40, 41, 42]  # calls cost most
    assert [i.length for i in choose_by_length(items, 32, 0.5)] == [40]  # a call is nearly free: the oldest, alone
    assert [i.length for i in choose_by_length(items, 2, 1e5)] == [9, 40]  # the limit holds: four runs of two
    short = choose_by_length(items[1:], 3, 32.0)
    assert items[1] in short and len(short) <= 3 and max(i.length for i in short) <= 9
    # A fit with no spread in batch sizes, or time that does not grow with tokens.
    flat = CostFit()
    for _ in range(10):
        flat.observe(100, 0.01)
    assert flat.overhead_tokens() == CostFit.DEFAULT
    for tokens in range(10, 200, 10):
        flat.observe(tokens, 0.01)
    assert flat.overhead_tokens() == CostFit.MAX


def test_a_batch_waits_briefly_for_requests_still_in_their_preprocess_stage():
    b = Batcher(32, 0.0)
    b.add(WorkItem("a", 1, "m", None, {"x": np.ones((1, 2), np.float32)}, 1, 10.0, 99.0))
    coming = {"m": 2}
    batch, wait = b.next_batch(10.0005, coming=lambda m: coming.get(m, 0))
    assert batch == [] and wait == pytest.approx(Batcher.stage_wait_s - 0.0005)
    assert len(b.next_batch(10.0 + Batcher.stage_wait_s, coming=lambda m: 1)[0]) == 1  # at most stage_wait_s
    b.add(WorkItem("b", 1, "m", None, {"x": np.ones((1, 2), np.float32)}, 1, 10.0, 99.0))
    assert len(b.next_batch(10.0001, coming=lambda m: 0)[0]) == 1  # nothing coming: no wait


def test_batch_limit_per_model():
    b = Batcher(32, 0.0, {"one": ModelBatching(cap=1), "four": ModelBatching(max_batch=4),
                          "big": ModelBatching(max_batch=64, cap=8)})
    assert [b.limit(m) for m in ("other", "one", "four", "big")] == [32, 1, 4, 8]
    for k in range(3):
        b.add(WorkItem(f"r{k}", 1, "one", None, {"x": np.ones((1, 2), np.float32)}, 1, 0.0, 99.0))
    assert [len(b.next_batch(1.0)[0]) for _ in range(3)] == [1, 1, 1]


def test_the_check_takes_any_length_up_to_the_maximum(monkeypatch):
    opts = parse_model_arg("s=ringserve.worker.demo:seq_encoder")
    opts.kwargs["buckets"] = [8, 16]
    m = ServedModel(opts, torch.device("cpu"))
    ids = np.ones((2, 16), np.int64)
    assert m.check_inputs({"input_ids": ids}) == 2  # the mask may be left out
    assert m.check_inputs({"input_ids": ids[:, :3], "attention_mask": ids[:, :3]}) == 2
    with pytest.raises(BadInput, match="beyond this model's maximum 16"):
        m.check_inputs({"input_ids": np.ones((1, 17), np.int64)})
    with pytest.raises(BadInput, match="disagree on the sequence length"):
        m.check_inputs({"input_ids": ids, "attention_mask": ids[:, :5]})
    with pytest.raises(BadInput, match="takes inputs"):
        m.check_inputs({"attention_mask": ids})
    module = demo.batch_mean()
    module.max_batch_size = 0
    monkeypatch.setattr(demo, "broken", lambda: module, raising=False)
    with pytest.raises(ModelLoadError, match="max_batch_size must be a positive integer"):
        ServedModel(parse_model_arg("b=ringserve.worker.demo:broken"), torch.device("cpu"))


def reference(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return {k: v.numpy() for k, v in out.items()}


def test_mixed_lengths_share_batches_and_equal_the_model_alone(cluster):
    cluster.start_master()
    cluster.start_workers(1, "--max-queue-delay-us", "50000", model="seq=ringserve.worker.demo:seq_encoder")
    model = demo.seq_encoder().eval()
    rng = np.random.default_rng(11)
    requests = []
    for k in range(48):
        length, rows = int(rng.integers(1, 129)), 1 + k % 3
        ids = rng.integers(1, 1000, (rows, length)).astype(np.int64)
        mask = np.ones_like(ids)
        if k % 4 == 0 and length > 2:
            mask[0, -2:] = 0  # the client padded this row itself
        requests.append((ids, mask, k % 2 == 0))  # every other request leaves the mask to the worker
    with Client(cluster.frontend, timeout=60) as c:
        futures = [c.infer_async("seq", {"input_ids": ids, **({"attention_mask": mask} if send else {})})
                   for ids, mask, send in requests]
        replies = [f.result(timeout=60) for f in futures]
        with pytest.raises(BadRequest, match="beyond this model's maximum 128"):
            c.infer("seq", {"input_ids": np.ones((1, 129), np.int64)})
        with pytest.raises(BadRequest, match="sequence length"):
            c.infer("seq", {"input_ids": np.ones((1, 9), np.int64), "attention_mask": np.ones((1, 8), np.int64)})
        assert c.infer("seq", {"input_ids": np.ones((1, 3), np.int64)})["pooled"].shape == (1, 64)  # still serving
    for (ids, mask, _), reply in zip(requests, replies):
        want = reference(model, ids, mask)
        assert reply.outputs["last_hidden_state"].shape == ids.shape + (64,)
        np.testing.assert_allclose(reply.outputs["pooled"], want["pooled"], rtol=1e-5, atol=1e-5)
        real = mask.astype(bool)  # padding the client sent itself is the model's to fill; compare real tokens
        np.testing.assert_allclose(reply.outputs["last_hidden_state"][real], want["last_hidden_state"][real],
                                   rtol=1e-5, atol=1e-5)
    rows = [r.header["batch_rows"] for r in replies]
    lengths = {ids.shape[1] for ids, _, _ in requests}
    assert max(rows) > 3 and len(lengths) > 20  # requests of different lengths did share batches
    admin = AdminClient(cluster.admin)  # figures travel on heartbeats: wait for all 49 computed requests
    stats = wait_until(lambda: (s := admin.status()["workers"][0]["stats"])["requests"] == 49 and s, 10)
    assert stats["mean_batch_size"] > 2, stats


def test_without_the_declaration_only_equal_lengths_batch(cluster):
    cluster.start_master()
    cluster.start_workers(1, "--max-queue-delay-us", "20000", model="seq=ringserve.worker.demo:seq_encoder,arg.ragged=false")
    with Client(cluster.frontend, timeout=60) as c:
        futures = [c.infer_async("seq", {"input_ids": np.ones((1, 5 + k), np.int64),
                                         "attention_mask": np.ones((1, 5 + k), np.int64)}) for k in range(8)]
        assert all(f.result(timeout=60).header["batch_rows"] == 1 for f in futures)
        with pytest.raises(BadRequest, match="attention_mask"):
            c.infer("seq", {"input_ids": np.ones((1, 3), np.int64)})  # not declared: the mask is required


def worker_log(cluster) -> str:
    return "".join(p.read_text() for p in cluster.tmp.glob("w*.log"))


@pytest.mark.parametrize("spec,batches", [("m=ringserve.worker.demo:batch_mean,arg.batchable=true", True),
                                          ("m=ringserve.worker.demo:batch_mean", False),
                                          ("m=ringserve.worker.demo:batch_mean,arg.batchable=true,max_batch=1", False)])
def test_outputs_that_are_not_per_row_stay_correct(cluster, spec, batches):
    """Batched, the failed batch is re-run one request at a time; declared unbatchable (the factory's
    max_batch_size = 1, or max_batch=1 in the spec), it is never batched and never re-run."""
    cluster.start_master()
    cluster.start_workers(1, "--max-queue-delay-us", "50000", model=spec)
    xs = [np.full((1 + k % 3, 4), float(k), np.float32) for k in range(16)]
    with Client(cluster.frontend, timeout=30) as c:
        replies = [f.result(timeout=30) for f in [c.infer_async("m", {"x": x}) for x in xs]]
    for x, r in zip(xs, replies):
        np.testing.assert_array_equal(r.outputs["mean"], x.mean(0, keepdims=True))
    stats = wait_until(lambda: (s := AdminClient(cluster.admin).status()["workers"][0]["stats"])["requests"] == 16
                       and s, 10)
    rerun = "batch_failed_rerunning_singly" in worker_log(cluster)
    assert rerun == batches and (stats["max_batch_size_seen"] > 3) == batches, stats
