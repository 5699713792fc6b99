"""Text in, embeddings out: a sentence-transformers model served with stages vs encode in-process.

Builds a BERT sentence-transformers directory from a config (no download: a word-level vocab,
random weights; `--size minilm` gives all-MiniLM-L6-v2's shapes), serves it with docs/models.md's
my_text.py (tokenizer = preprocess stage, token embeddings = the module batched ragged, mean
pooling + Normalize = postprocess stage) by 1 master and 1 worker, and keeps `--concurrency`
single-sentence requests in flight (closed loop) for `--seconds`. The in-process reference is
`SentenceTransformer.encode` (batch 16) on the same sentences with the same torch thread count,
in the same run (without sentence-transformers: the same steps with transformers, sorted by
length and 16 at a time, as encode does). `--size` is minilm unless told.

The two sides are measured in `--rounds` alternating turns (served, then in-process, each
`--seconds / --rounds`), so load from other processes on a shared machine falls on both alike.

Prints one JSON line: sentences_per_s, inprocess_sentences_per_s, ratio, preprocess_ms_p50 (from
the replies' timing), mean_batch_rows (exact, from each reply's batch_rows), timing_ms_p50 (every
stage of the replies' timing: where a request's time goes in the worker; client_ms, the round
trip at the client; outside_worker_ms, the part of it no worker stage covers: client, master,
sockets, and waits for a stage thread), cpu_ms_per_sentence (CPU time of the worker, the master,
the client and the in-process side per sentence: what contention from other processes on a
shared machine changes least), errors, and the setup.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ringserve.client import Client  # noqa: E402
from ringserve.launch.logsetup import configure_logging  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_for_workers  # noqa: E402

EPH = "tcp://127.0.0.1:*"
SIZES = {"tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512),
         "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)}


def sentences(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(n sentences of 4..40 words, the vocabulary's words)."""
    rng = np.random.default_rng(seed)
    words = [f"w{k}" for k in range(2000)]
    return [" ".join(rng.choice(words, int(rng.integers(4, 41)))) for _ in range(n)], words


def build_model(d: Path, words: list[str], size: str) -> Path:
    import torch
    import transformers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512).save_pretrained(d)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(vocab), max_position_embeddings=512,
                                                   **SIZES[size])).save_pretrained(d)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": SIZES[size]["hidden_size"],
                                                           "pooling_mode_mean_tokens": True}))
    (d / "2_Normalize").mkdir(exist_ok=True)
    return d


def in_process(d: Path, threads: int):
    """(encode(batch) as SentenceTransformer.encode does it with batch 16, what it is)."""
    import torch

    torch.set_num_threads(threads)
    try:
        from sentence_transformers import SentenceTransformer

        model, how = SentenceTransformer(str(d), device="cpu"), "sentence_transformers.encode"
        encode = lambda batch: model.encode(batch, batch_size=16)  # noqa: E731
    except ImportError:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(d)
        bert, how = transformers.AutoModel.from_pretrained(d).eval(), "transformers pipeline"

        def encode(batch):  # as encode does: longest first, 16 at a time
            batch = sorted(batch, key=len, reverse=True)
            for i in range(0, len(batch), 16):
                x = tok(batch[i:i + 16], padding=True, truncation=True, max_length=256, return_tensors="pt")
                with torch.inference_mode():
                    h = bert(**x).last_hidden_state
                m = x["attention_mask"].unsqueeze(-1).float()
                torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)
    return encode, how


def encode_for(encode, texts: list[str], seconds: float) -> tuple[int, float]:
    """(sentences encoded, seconds taken): 256 sentences at a time for about `seconds`."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        encode(texts[:256])
        n += 256
    return n, time.perf_counter() - t0


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def measure(d: Path, pkg: Path, texts: list[str], args, tmp: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{pkg}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    master = RoleProcess("ringserve.launch.master", ["--frontend", EPH, "--backend", EPH, "--admin", EPH,
                                                     "--log-level", "warning"], tmp / "master.log")
    worker = None
    try:
        spec = f"st=my_text:encoder,preprocess=my_text:tokenizer,postprocess=my_text:pooling,arg.path={d}"
        worker = RoleProcess("ringserve.launch.worker", ["--master", master.info["backend"], "--model", spec,
                                                         "--device", "cpu", "--threads", str(args.threads),
                                                         "--stage-threads", str(args.stage_threads),
                                                         "--log-level", "warning", *args.worker_arg],
                             tmp / "worker.log", env=env)
        wait_for_workers(master.info["admin"], 1, 120)
        encode, how = in_process(d, args.threads)
        encode(texts[:32])  # warm-up
        rounds, inproc = [], [0, 0.0]
        cpu = dict.fromkeys(("worker", "master", "client", "inprocess"), 0.0)  # CPU seconds while measuring
        with Client(master.info["frontend"], timeout=60) as c:
            loop(c, texts, args.concurrency, 1.0)  # warm-up
            for _ in range(args.rounds):
                before = cpu_s(worker.pid), cpu_s(master.pid), time.process_time()
                rounds.append(loop(c, texts, args.concurrency, args.seconds / args.rounds))
                cpu["worker"] += cpu_s(worker.pid) - before[0]
                cpu["master"] += cpu_s(master.pid) - before[1]
                cpu["client"] += time.process_time() - before[2]
                t0 = time.process_time()
                n, took = encode_for(encode, texts, args.seconds / args.rounds)
                cpu["inprocess"] += time.process_time() - t0
                inproc[0] += n
                inproc[1] += took
        r = summary(rounds)
        r["inprocess_sentences_per_s"], r["inprocess"] = round(inproc[0] / inproc[1], 1), how
        r["ratio"] = round(r["sentences_per_s"] / r["inprocess_sentences_per_s"], 3)
        served_n = sum(len(x["headers"]) for x in rounds)
        # CPU per sentence is what contention from other processes changes least: where the work goes.
        r["cpu_ms_per_sentence"] = {k: round(1000 * v / max(inproc[0] if k == "inprocess" else served_n, 1), 3)
                                    for k, v in cpu.items()}
        return r
    finally:
        if worker:
            worker.stop()
        master.stop()


def loop(c: Client, texts: list[str], concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` single-sentence requests in flight for `seconds`: the replies'
    headers, the errors and the time taken."""
    errors = k = 0
    headers = []
    t0 = time.perf_counter()
    end = t0 + seconds

    sent = {}

    def submit():
        nonlocal k
        k += 1
        f = c.infer_async("st", {"text": [texts[k % len(texts)]]}, timeout=60)
        sent[f] = time.perf_counter()
        return f

    inflight = {submit() for _ in range(concurrency)}
    while inflight:
        done, inflight = wait(inflight, return_when=FIRST_COMPLETED, timeout=120)
        if not done:
            raise RuntimeError("no reply for 120 s")
        for f in done:
            if f.exception() is not None:
                errors += 1
            else:
                header = f.result().header
                header["client_ms"] = 1000 * (time.perf_counter() - sent[f])  # sent to answered, at the client
                headers.append(header)
            sent.pop(f, None)
            if time.perf_counter() < end:
                inflight.add(submit())
    return {"headers": headers, "errors": errors, "seconds": time.perf_counter() - t0}


def summary(rounds: list[dict]) -> dict:
    """The rounds' figures together: rate, mean batch rows (each reply weighs 1/its batch's rows),
    and the median of each timing field."""
    headers = [h for r in rounds for h in r["headers"]]
    n, took = len(headers), sum(r["seconds"] for r in rounds)
    batches = sum(1 / h["batch_rows"] for h in headers)
    stages = sorted({k for h in headers for k in h.get("timing", {})})
    p50 = {k: round(float(np.median([h["timing"][k] for h in headers if k in h["timing"]])), 3) for k in stages}
    if headers:  # the round trip at the client, and what of it the worker's own timing does not cover
        p50["client_ms"] = round(float(np.median([h["client_ms"] for h in headers])), 3)
        p50["outside_worker_ms"] = round(float(np.median([h["client_ms"] - sum(h["timing"].values())
                                                          for h in headers])), 3)
    return {"sentences_per_s": round(n / took, 1), "preprocess_ms_p50": p50.get("preprocess_ms"),
            "mean_batch_rows": round(n / max(batches, 1e-9), 2), "timing_ms_p50": p50,
            "errors": sum(r["errors"] for r in rounds)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=6.0, help="measurement time for each side")
    p.add_argument("--rounds", type=int, default=3, help="alternating turns of the two sides")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--threads", type=int, default=1, help="torch threads: the worker's --threads and in-process")
    p.add_argument("--stage-threads", type=int, default=2)
    p.add_argument("--size", choices=sorted(SIZES), default="minilm",
                   help="minilm: all-MiniLM-L6-v2's shapes (the model issue 18 is about); tiny: 2 layers of width 128")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                   help="one more worker flag (repeatable), e.g. --worker-arg=--max-queue-delay-us=2000")
    args = p.parse_args(argv)
    configure_logging("bench", "warning")
    tmp = Path(tempfile.mkdtemp(prefix="rs-text-"))
    texts, words = sentences(1024)
    d = build_model(tmp / "model", words, args.size)
    code = re.search(r"<!-- stages: my_text\.py.*?-->\s*```python\n(.*?)```", (ROOT / "docs" / "models.md").read_text(),
                     re.S).group(1)
    (tmp / "pkg").mkdir()
    (tmp / "pkg" / "my_text.py").write_text(code)
    r = {"size": args.size, "concurrency": args.concurrency, "threads": args.threads,
         "stage_threads": args.stage_threads, "worker_args": args.worker_arg, **measure(d, tmp / "pkg", texts, args, tmp)}
    print(json.dumps(r))


if __name__ == "__main__":
    main()
