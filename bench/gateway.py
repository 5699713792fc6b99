"""The gateway's throughput, p99 and CPU per request over HTTP (JSON and binary tensors) and gRPC,
beside ringserve's own ZeroMQ client on the same cluster; prints one JSON line.

1 master, 1 worker serving the MLP of bench/throughput.py (256->1024->1024->10 fp32, the worker's
default batching), 1 gateway (access log on, as deployed). Load comes from separate processes,
closed loop, `--concurrency` single-row requests in flight over all of them: raw HTTP/1.1
keep-alive connections (one request in flight per connection), gRPC through the generated stub
(grpc.aio), and AsyncClient (bench/loadgen.py), whose phase runs before the gateway's and again
after them: the `*_vs_zmq_client` ratios divide by the mean of the two, so a swing of the shared
machine during one ZMQ phase moves the reference by half as much. CPU per request is read from the gateway's own
/proc counters over the measured window, so it holds on a noisy machine. Headline figures
(`http_req_per_s`, `http_p99_ms`, `gateway_cpu_us_per_req`, `http_vs_zmq_client`) are the binary
path; `http_json_*`, `http_binary_*` and `grpc_*` give each path; `--paths` a subset of the
paths. To compare with older code, run this file from a checkout of it (`git worktree add`) with
PYTHONPATH pointing at a folder whose `ringserve` is that checkout.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentiles  # noqa: E402
from bench.loadgen import proc_cpu_s, run_load  # noqa: E402
from ringserve.launch.logsetup import configure_logging  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_for_workers  # noqa: E402

EPH = "tcp://127.0.0.1:*"


def http_bodies(x: np.ndarray) -> dict[str, tuple[bytes, bytes]]:
    """(extra headers, body) for the JSON and the binary paths."""
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    js = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return {"json": (b"Content-Type: application/json\r\n", js),
            "binary": (b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: "
                       + str(len(head)).encode() + b"\r\n", head + x.tobytes())}


def _http_proc(port: int, path: str, conns: int, warmup: float, seconds: float, start_at: float, out) -> None:
    import asyncio

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    x = np.random.default_rng(os.getpid()).standard_normal((1, 256), dtype=np.float32)
    extra, body = http_bodies(x)[path]
    req = (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: bench\r\n" + extra + b"Content-Length: "
           + str(len(body)).encode() + b"\r\n\r\n" + body)

    async def conn(end: float, lat: list, errors: list) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < end:
                t = time.perf_counter()
                w.write(req)
                head = await r.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await r.readexactly(length)
                lat.append(time.perf_counter() - t)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors.append(1)
        finally:
            w.close()

    async def main() -> None:
        await asyncio.gather(*(conn(time.perf_counter() + warmup, [], []) for _ in range(conns)))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        lat, errors = [], []
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(conn(t0 + seconds, lat, errors) for _ in range(conns)))
        out.send((len(lat), len(errors), time.perf_counter() - t0, time.process_time() - cpu0, lat))

    asyncio.run(main())


def _grpc_proc(address: str, conns: int, warmup: float, seconds: float, start_at: float, out) -> None:
    import asyncio

    import grpc

    from ringserve.gateway.oip_grpc import open_inference_grpc_pb2 as pb
    from ringserve.gateway.oip_grpc import open_inference_grpc_pb2_grpc as pb_grpc

    x = np.random.default_rng(os.getpid()).standard_normal((1, 256), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=[1, 256])

    async def worker(stub, end: float, lat: list, errors: list) -> None:
        while time.perf_counter() < end:
            t = time.perf_counter()
            try:
                await stub.ModelInfer(request)
            except grpc.aio.AioRpcError:
                errors.append(1)
            lat.append(time.perf_counter() - t)

    async def main() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await asyncio.gather(*(worker(stub, time.perf_counter() + warmup, [], []) for _ in range(conns)))
            await asyncio.sleep(max(0.0, start_at - time.time()))
            lat, errors = [], []
            cpu0, t0 = time.process_time(), time.perf_counter()
            await asyncio.gather(*(worker(stub, t0 + seconds, lat, errors) for _ in range(conns)))
            out.send((len(lat), len(errors), time.perf_counter() - t0, time.process_time() - cpu0, lat))

    asyncio.run(main())


def drive(target, args_of, concurrency: int, processes: int, seconds: float, gateway_pid: int,
          warmup: float = 0.5) -> dict:
    """Run `processes` load processes of `target`; figures plus the gateway's CPU per request."""
    ctx = mp.get_context("spawn")
    start_at = time.time() + warmup + 3.0
    per = max(1, concurrency // processes)
    pipes, procs = [], []
    for _ in range(processes):
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=target, args=(*args_of, per, warmup, seconds, start_at, w), daemon=True)
        p.start()
        pipes.append(r)
        procs.append(p)
    try:
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = proc_cpu_s(gateway_pid)
        answered = errors = 0
        took = client_cpu = 0.0
        lat: list = []
        for r in pipes:
            if not r.poll(seconds + 60):
                raise RuntimeError("a load process did not report")
            n, e, t, c, lt = r.recv()
            answered, errors, took, client_cpu = answered + n, errors + e, max(took, t), client_cpu + c
            lat.extend(lt)
        gw_cpu = proc_cpu_s(gateway_pid) - cpu0
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    p50, p99 = percentiles(lat)
    n = max(1, answered)
    return {"req_per_s": round(answered / took, 1) if took else 0.0, "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3), "errors": errors, "gateway_cpu_us": round(gw_cpu / n * 1e6, 1),
            "client_cpu_us": round(client_cpu / n * 1e6, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="measurement time per path")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight, over all load processes")
    p.add_argument("--load-processes", type=int, default=2, help="separate processes driving the load")
    p.add_argument("--device", default="cpu")
    p.add_argument("--paths", default="json,binary,grpc", help="which paths to measure (the ZMQ client always)")
    args = p.parse_args(argv)
    configure_logging("bench", "warning")  # stdout is the one JSON line
    tmp = Path(tempfile.mkdtemp(prefix="rs-bench-gw-"))
    procs: list[RoleProcess] = []
    try:
        master = RoleProcess("ringserve.launch.master", ["--frontend", EPH, "--backend", EPH, "--admin", EPH,
                                                         "--log-level", "warning"], tmp / "master.log")
        procs.append(master)
        procs.append(RoleProcess("ringserve.launch.worker", [
            "--master", master.info["backend"], "--model", "mlp=ringserve.worker.demo:mlp", "--device", args.device,
            "--log-level", "warning", "--threads", str(os.environ.get("RS_THREADS", 1))], tmp / "worker.log"))
        wait_for_workers(master.info["admin"], 1, 60)
        gw = RoleProcess("ringserve.launch.gateway", ["--master", master.info["frontend"], "--admin",
                                                      master.info["admin"], "--listen", "127.0.0.1:0",
                                                      "--grpc-listen", "127.0.0.1:0"], tmp / "gateway.log")
        procs.append(gw)
        port = int(gw.info["url"].rsplit(":", 1)[1])
        def zmq_phase():
            res, _ = run_load(master.info["frontend"], "mlp", (1, 256), args.concurrency, args.seconds,
                              processes=args.load_processes)
            return res

        zmq_runs = [zmq_phase()]
        paths = args.paths.split(",")
        none = {"req_per_s": 0.0, "p50_ms": None, "p99_ms": None, "errors": 0, "gateway_cpu_us": None,
                "client_cpu_us": None}
        figures = {path: drive(_http_proc, (port, path), args.concurrency, args.load_processes, args.seconds, gw.pid)
                   if path in paths else none for path in ("json", "binary")}
        figures["grpc"] = drive(_grpc_proc, (gw.info["grpc"],), args.concurrency, args.load_processes,
                                args.seconds, gw.pid) if "grpc" in paths else none
        zmq_runs.append(zmq_phase())  # again after the gateway's phases: the ratios' reference brackets them
        rates = [res.rate for res in zmq_runs]
        zp99 = max(res.percentiles_ms()[1] for res in zmq_runs)
        zmq = {"req_per_s": round(sum(rates) / len(rates), 1), "p99_ms": round(zp99, 3),
               "errors": sum(res.errors for res in zmq_runs), "runs": [round(r, 1) for r in rates]}
    finally:
        for proc in reversed(procs):
            proc.stop()
    b, j, g = figures["binary"], figures["json"], figures["grpc"]
    r = {"device": args.device, "concurrency": args.concurrency, "load_processes": args.load_processes,
         "http_req_per_s": b["req_per_s"], "http_p99_ms": b["p99_ms"], "gateway_cpu_us_per_req": b["gateway_cpu_us"],
         "http_vs_zmq_client": round(b["req_per_s"] / zmq["req_per_s"], 3) if zmq["req_per_s"] else None,
         "grpc_req_per_s": g["req_per_s"], "grpc_p99_ms": g["p99_ms"],
         "grpc_gateway_cpu_us_per_req": g["gateway_cpu_us"],
         "grpc_vs_zmq_client": round(g["req_per_s"] / zmq["req_per_s"], 3) if zmq["req_per_s"] else None,
         "zmq_client_req_per_s": zmq["req_per_s"], "zmq_client_p99_ms": zmq["p99_ms"],
         "zmq_client_req_per_s_runs": zmq["runs"]}
    for name, f in (("http_json", j), ("http_binary", b), ("grpc", g)):
        r.update({f"{name}_req_per_s": f["req_per_s"], f"{name}_p50_ms": f["p50_ms"], f"{name}_p99_ms": f["p99_ms"],
                  f"{name}_gateway_cpu_us_per_req": f["gateway_cpu_us"],
                  f"{name}_client_cpu_us_per_req": f["client_cpu_us"],
                  f"{name}_vs_zmq_client": round(f["req_per_s"] / zmq["req_per_s"], 3) if zmq["req_per_s"] else None})
    r["errors"] = zmq["errors"] + j["errors"] + b["errors"] + g["errors"]
    print(json.dumps(r))


if __name__ == "__main__":
    main()
