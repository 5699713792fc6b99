"""Small helpers several test files share (imported as `helpers`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import signal
import subprocess
import sys
from contextlib import contextmanager

import torch
import zmq

from ringserve.protocol.messages import READY, WORKER_PROTO
from ringserve.worker import demo


def mlp_state(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in demo.mlp(seed=seed).state_dict().items()}


def expected(state, x):
    """The demo MLP's output for `x` with `state`, computed in-process."""
    m = demo.mlp().eval()
    m.load_state_dict(state)
    with torch.inference_mode():
        return m(torch.from_numpy(x))["logits"].numpy()


def shard_list(endpoints: dict) -> str:
    return ",".join(f"{n}={e}" for n, e in endpoints.items())


def run_local(*args: str, timeout: float = 150) -> tuple[int, str, str]:
    """Run ringserve-local to the end (SIGTERM on a timeout makes it stop what it started)."""
    proc = subprocess.Popen([sys.executable, "-m", "ringserve.launch.local", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=30)
    return proc.returncode, stdout, stderr


def version_piece_file(model_dir, version: int):
    """The largest piece file (paramserver/store.py's pieces/<sha256>) that version `version`
    of the model in `model_dir` references and no other version on disk does."""
    import json
    from pathlib import Path

    d = Path(model_dir)
    mine = {item[6] for item in json.loads((d / f"v{version}.manifest.json").read_text())["pieces"]}
    others = {item[6] for mf in d.glob("v*.manifest.json") if mf.name != f"v{version}.manifest.json"
              for item in json.loads(mf.read_text()).get("pieces", [])}
    return max((d / "pieces" / c for c in mine - others), key=lambda p: p.stat().st_size)


def flip_a_byte(path) -> None:
    """Corrupt a file in place (one byte in the middle), as a torn write or bit rot would."""
    from pathlib import Path

    raw = bytearray(Path(path).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(raw))


def stop_together(procs) -> None:
    """Stop RoleProcesses as each one's stop() does (SIGCONT, SIGTERM, SIGKILL if still there 3 s
    later), but SIGTERM all of them first, so they wind down together rather than one after
    another (a shard's repair round waits up to 2 s on a peer that already left)."""
    for p in reversed(procs):
        if p.alive():
            try:
                p.signal(signal.SIGCONT)
                p.signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in reversed(procs):
        p.stop(timeout=3)


@contextmanager
def noop_agent_and_master():
    """(agent, router): a WorkerAgent serving the no-op model, its compute thread not started, its
    DEALER connected to a ROUTER on an ephemeral port standing in for the master, READY already read
    there. Every socket is closed and the context ended after, whatever the test did."""
    from ringserve.worker.agent import WorkerAgent, WorkerConfig
    from ringserve.worker.loader import ServedModel, parse_model_arg

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    model = ServedModel(parse_model_arg("noop=ringserve.worker.demo:noop"), torch.device("cpu"))
    agent = WorkerAgent(WorkerConfig(master=f"tcp://127.0.0.1:{port}"), {"noop": model}, ctx=ctx)
    try:
        agent._connect(agent.links[0])  # a real DEALER: READY goes out
        assert router.poll(10_000) and router.recv_multipart()[1:3] == [WORKER_PROTO, READY]
        yield agent, router
    finally:
        for sock in [link.dealer for link in agent.links if link.dealer is not None] + [agent.results]:
            sock.close(linger=0)
        router.close(linger=0)
        ctx.term()
