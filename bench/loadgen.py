"""Load from separate processes, CPU read from each process's own counters.

The load generator must not be what limits a figure, and a CPU figure must hold on a noisy
machine, so: each load process runs its own AsyncClient (or raw DEALER) in a closed loop and
reports its own CPU time (``time.process_time``), and server processes are read from
``/proc/<pid>/stat`` before and after the measured window. CPU per request is then
``cpu seconds / requests answered`` for each role, independent of wall-clock noise.

``zmq_limit`` measures, in the same run, a minimal Python ZeroMQ broker (client DEALER ->
ROUTER -> worker DEALER -> back, no model): the ceiling any Python broker reaches here.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field

import numpy as np

_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (Linux /proc), children not included."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15)


@dataclass
class LoadResult:
    answered: int = 0
    errors: int = 0
    seconds: float = 0.0
    client_cpu_s: float = 0.0
    latencies_s: list = field(default_factory=list)
    runnable: dict | None = None  # RS_LOADGEN_RUNSTATE=1: runnable_shares over the window

    @property
    def rate(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def percentiles_ms(self) -> tuple[float, float]:
        from bench.common import percentiles
        return percentiles(self.latencies_s)


def _client_proc(address: str, model: str, row_shape: tuple, concurrency: int, warmup: float, seconds: float,
                 start_at: float, out) -> None:
    """One load process: a ringserve AsyncClient kept at `concurrency` in flight (no thread hand-over)."""
    import asyncio

    from ringserve.client import AsyncClient

    x = np.random.default_rng(os.getpid()).standard_normal(row_shape, dtype=np.float32)

    async def closed_loop(c, run_s: float, lat: list) -> int:
        """Each answer sends the next request from its done-callback, until `run_s` has passed."""
        end = time.perf_counter() + run_s
        errors = 0
        finished = asyncio.get_running_loop().create_future()
        live = 0

        def submit() -> None:
            nonlocal live
            live += 1
            started = time.perf_counter()
            c.submit(model, {"x": x}, timeout=30).add_done_callback(lambda f: done(f, started))

        def done(f, started: float) -> None:
            nonlocal errors, live
            live -= 1
            now = time.perf_counter()
            lat.append(now - started)
            if f.cancelled() or f.exception() is not None:
                errors += 1
            if now < end:
                submit()
            elif live == 0 and not finished.done():
                finished.set_result(None)

        for _ in range(concurrency):
            submit()
        await asyncio.wait_for(finished, run_s + 60)
        return errors

    async def main() -> None:
        async with AsyncClient(address, timeout=30) as c:
            await closed_loop(c, warmup, [])
            await asyncio.sleep(max(0.0, start_at - time.time()))
            lat: list = []
            spy = _start_profile(seconds)
            marks = _marks(c)
            cpu0, t0 = time.process_time(), time.perf_counter()
            errors = await closed_loop(c, seconds, lat)
            cpu, took = time.process_time() - cpu0, time.perf_counter() - t0
            _stop_profile(spy, len(lat), marks, _marks(c))
            out.send((len(lat), errors, took, cpu, lat))

    # RS_LOADGEN_GC=freeze / RS_LOADGEN_LOOP=uvloop: levers the process that runs a client may pull
    # (not the client's own code), measured beside the defaults; the figures use the defaults.
    if os.environ.get("RS_LOADGEN_GC") == "freeze":
        import gc

        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
    if os.environ.get("RS_LOADGEN_LOOP") == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def _start_profile(seconds: float):
    """RS_LOADGEN_PROFILE=DIR: py-spy samples this load process over its measured window (the
    figure of that run then carries py-spy's own cost, a few per cent: for shares, not figures)."""
    where = os.environ.get("RS_LOADGEN_PROFILE")
    if not where:
        return None
    import shutil
    import subprocess
    import sys

    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    os.makedirs(where, exist_ok=True)
    return subprocess.Popen([spy, "record", "--nonblocking", "-r", "250", "-d", str(max(1, int(seconds))),
                             "-f", "raw", "-o", os.path.join(where, f"load-{os.getpid()}.txt"), "-p", str(os.getpid())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _marks(c) -> dict:
    """What the window's split is read from: the process's and this thread's CPU, the kernel's
    share, context switches, and the client's messages each way."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"process_cpu": time.process_time(), "main_thread_cpu": time.thread_time(), "user": ru.ru_utime,
            "system": ru.ru_stime, "voluntary_switches": ru.ru_nvcsw, "involuntary_switches": ru.ru_nivcsw,
            "messages_in": c.stats.batches_received, "messages_out": c.stats.batches_sent + 0}


def _stop_profile(spy, answered: int, before: dict, after: dict) -> None:
    """Waits for py-spy (bounded) and writes the window's split beside its profile, per answer."""
    if spy is None:
        return
    try:
        spy.wait(30)
    except Exception:
        spy.kill()
        spy.wait(5)
    import json

    n = max(answered, 1)
    split = {k: round((after[k] - before[k]) / n * (1e6 if isinstance(before[k], float) else 1), 3) for k in before}
    where = os.environ["RS_LOADGEN_PROFILE"]
    with open(os.path.join(where, f"load-{os.getpid()}.json"), "w") as f:
        f.write(json.dumps({"answered": answered, "per_answer": split}) + "\n")


def runnable_shares(pids: dict[str, int], seconds: float, period_s: float = 0.001) -> dict:
    """Sample each named process's threads' state ('R': running or runnable) every `period_s` for
    `seconds`: {"by_count": {n: share of samples with n processes runnable}, "by_role": {name: share}}."""
    tasks = {}
    for name, pid in pids.items():
        try:
            tasks[name] = [f"/proc/{pid}/task/{t}/stat" for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
    by_count: dict[int, int] = {}
    by_role = dict.fromkeys(tasks, 0)
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end and n < int(seconds / period_s) + 1:
        running = 0
        for name, paths in tasks.items():
            for path in paths:
                try:
                    with open(path, "rb") as f:
                        state = f.read().rsplit(b")", 1)[1].split(None, 1)[0]
                except OSError:
                    continue
                if state == b"R":
                    running += 1
                    by_role[name] += 1
                    break
        by_count[running] = by_count.get(running, 0) + 1
        n += 1
        time.sleep(period_s)
    n = max(n, 1)
    return {"samples": n, "by_count": {k: round(v / n, 3) for k, v in sorted(by_count.items())},
            "by_role": {k: round(v / n, 3) for k, v in by_role.items()}}


def run_load(address: str, model: str, row_shape: tuple, concurrency: int, seconds: float,
             processes: int = 2, warmup: float = 0.5, server_pids: dict[str, int] | None = None
             ) -> tuple[LoadResult, dict[str, float]]:
    """Drive `concurrency` requests in flight from `processes` load processes.

    Returns the merged result and the CPU seconds each server pid spent in the window."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    start_at = time.time() + warmup + 3.0  # every process starts measuring at the same moment
    per = max(1, concurrency // processes)
    for _ in range(processes):
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_client_proc, args=(address, model, row_shape, per, warmup, seconds, start_at, w),
                        daemon=True)
        p.start()
        pipes.append(r)
        procs.append(p)
    server_pids = server_pids or {}
    try:
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = {k: proc_cpu_s(pid) for k, pid in server_pids.items()}
        res = LoadResult()
        sampler = None
        if os.environ.get("RS_LOADGEN_RUNSTATE") == "1":
            import threading

            roles = {**server_pids, **{f"load{i}": p.pid for i, p in enumerate(procs)}}
            sampler = threading.Thread(target=lambda: setattr(res, "runnable", runnable_shares(roles, seconds * 0.8)),
                                       daemon=True)
            sampler.start()
        for r in pipes:
            if not r.poll(seconds + 60):
                raise RuntimeError("a load process did not report")
            n, errors, took, cpu, lat = r.recv()
            res.answered += n
            res.errors += errors
            res.seconds = max(res.seconds, took)
            res.client_cpu_s += cpu
            res.latencies_s.extend(lat)
        cpu = {k: proc_cpu_s(pid) - cpu0[k] for k, pid in server_pids.items()}
        if sampler is not None:
            sampler.join(seconds + 5)
        return res, cpu
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()


# ----------------------------------------------------------- the ZeroMQ ceiling
def _limit_broker(ready, stop_at: float) -> None:
    import zmq

    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for s in (front, back):
        s.linger = 0
    front.bind("tcp://127.0.0.1:*")
    back.bind("tcp://127.0.0.1:*")
    ready.send((front.getsockopt_string(zmq.LAST_ENDPOINT), back.getsockopt_string(zmq.LAST_ENDPOINT)))
    worker = back.recv_multipart()[0]  # the worker says hello first
    ready.send("worker")  # only now may the clients start: their window must not pass with no worker
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while time.time() < stop_at:
        for sock, _ in poller.poll(100):
            while True:
                try:
                    msg = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if sock is front:  # [client, body] -> [worker, client, body]
                    back.send_multipart([worker, *msg])
                else:  # [worker, client, body] -> [client, body]
                    front.send_multipart(msg[1:])
    ctx.destroy(linger=0)


def _limit_worker(endpoint: str, stop_at: float) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    s.send(b"hello")
    while time.time() < stop_at:
        if s.poll(100):
            s.send_multipart(s.recv_multipart())
    ctx.destroy(linger=0)


def _limit_client(endpoint: str, concurrency: int, seconds: float, start_at: float, out) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    body = b"x" * 1100  # about the size of a single-row MLP request
    time.sleep(max(0.0, start_at - time.time()))
    t0, cpu0 = time.perf_counter(), time.process_time()
    end, n = t0 + seconds, 0
    for _ in range(concurrency):
        s.send(body)
    while time.perf_counter() < end:
        if s.poll(1000):
            s.recv()
            n += 1
            s.send(body)
    out.send((n, time.perf_counter() - t0, time.process_time() - cpu0))
    ctx.destroy(linger=0)


def zmq_limit(seconds: float, concurrency: int = 64, processes: int = 2) -> dict:
    """Round trips per second through a minimal Python ROUTER broker to one echo worker, and the
    CPU per round trip of its broker, its worker and its clients (the floor for each role)."""
    ctx = mp.get_context("spawn")
    stop_at = time.time() + seconds + 75.0  # past the worker's start (up to 60 s) and the window
    r, w = ctx.Pipe(duplex=False)
    broker = ctx.Process(target=_limit_broker, args=(w, stop_at), daemon=True)
    broker.start()
    front, back = r.recv()
    worker = ctx.Process(target=_limit_worker, args=(back, stop_at), daemon=True)
    worker.start()
    if not r.poll(60) or r.recv() != "worker":  # on a loaded machine a spawned worker can take seconds
        raise RuntimeError("the minimal broker's echo worker did not connect")
    start_at = time.time() + 3.0
    pipes, clients = [], []
    for _ in range(processes):
        cr, cw = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_limit_client, args=(front, max(1, concurrency // processes), seconds, start_at, cw),
                        daemon=True)
        p.start()
        pipes.append(cr)
        clients.append(p)
    try:
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = {"broker": proc_cpu_s(broker.pid), "worker": proc_cpu_s(worker.pid)}
        total, took, client_cpu = 0, 0.0, 0.0
        for cr in pipes:
            n, t, c = cr.recv()
            total, took, client_cpu = total + n, max(took, t), client_cpu + c
        n = max(total, 1)
        return {"req_per_s": total / took, "client_cpu_us": client_cpu / n * 1e6,
                **{f"{k}_cpu_us": (proc_cpu_s(pid) - cpu0[k]) / n * 1e6
                   for k, pid in (("broker", broker.pid), ("worker", worker.pid))}}
    finally:
        for p in (*clients, worker, broker):
            p.kill()
            p.join(5)
