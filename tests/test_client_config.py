"""A client set up wrongly says so: unusable keys or address raise ConfigError in the caller's
thread at construction (Client and AsyncClient), and a request the master never answered fails
with a Timeout that says what the socket saw: nothing listening, a refused CURVE handshake."""
from __future__ import annotations

import asyncio
import socket
import threading

import numpy as np
import pytest

from ringserve.client import AsyncClient, Client, ConfigError, RingserveError, Timeout
from ringserve.protocol.security import Security, create_identity

pytestmark = pytest.mark.timeout(120)

X = {"x": np.zeros((1, 16), np.float32)}


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    for role, name in (("master", "m"), ("client", "c1"), ("client", "c2")):
        create_identity(d, role, name)
    return str(d)


def io_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "ringserve-client-io")


def free_port() -> int:
    """A port nothing listens on (bound and released: the kernel will not hand it out again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("make", [Client, AsyncClient], ids=["Client", "AsyncClient"])
def test_unusable_keys_or_address_raise_config_error_at_construction(keys, tmp_path, make):
    before = io_threads()
    with pytest.raises(ConfigError, match="expected exactly one client key, found \\['c1', 'c2'\\]"):
        make("tcp://127.0.0.1:5555", security=Security(keys, "client"))  # two client keys, none named
    with pytest.raises(ConfigError, match="cannot read the client secret key"):
        make("tcp://127.0.0.1:5555", security=Security(keys, "client", "nobody"))
    empty = tmp_path / "nomaster"
    create_identity(empty, "client", "c1")
    with pytest.raises(ConfigError, match="expected exactly one master key"):
        make("tcp://127.0.0.1:5555", security=Security(str(empty), "client"))
    with pytest.raises(ConfigError, match="cannot connect to 'localhost:5555'"):
        make("localhost:5555")
    assert io_threads() == before  # nothing was left running to print a traceback later


def test_named_key_among_two_works(keys, cluster):
    cluster.start_master("--keys", keys)
    with Client(cluster.frontend, timeout=2.0, grace=0.3, security=Security(keys, "client", "c2")) as c:
        with pytest.raises(RingserveError) as exc:  # no worker serves mlp: UNKNOWN_MODEL once the grace ends
            c.infer("mlp", X)
    assert "is the master up" not in str(exc.value)  # the master answered: it is up and took the key
    assert c.stats.handshake_failures == 0


def test_nobody_listening_says_no_connection(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    with Client(address, timeout=0.8, grace=0.2) as c:
        with pytest.raises(Timeout) as exc:
            c.infer("mlp", X)
    msg = str(exc.value)
    assert f"no answer from {address}: is the master up, are the keys right?" in msg
    assert "no connection could be made" in msg


def test_no_key_and_unknown_key_against_curve_master_say_so(keys, cluster, tmp_path):
    cluster.start_master("--keys", keys)
    address = cluster.frontend
    with Client(address, timeout=1.0, grace=0.2) as c:  # no keys at all
        with pytest.raises(Timeout) as exc:
            c.infer("mlp", X)
    assert f"no answer from {address}: is the master up, are the keys right?" in str(exc.value)
    assert "requires CURVE keys" in str(exc.value) and "this client has none" in str(exc.value)
    assert c.stats.handshake_failures >= 1

    other = tmp_path / "other"  # a client key the master has never seen, with the master's public key
    create_identity(other, "client", "stranger")
    (other / "public" / "master").mkdir(parents=True)
    master_key = tmp_path / "keys" / "public" / "master" / "m.key"
    (other / "public" / "master" / "m.key").write_bytes(master_key.read_bytes())
    with Client(address, timeout=1.0, grace=0.2, security=Security(str(other), "client")) as c:
        with pytest.raises(Timeout) as exc:
            c.infer("mlp", X)
    assert "the master refused this client's key" in str(exc.value)


def test_async_client_timeout_says_what_is_known(keys, cluster):
    cluster.start_master("--keys", keys)

    async def main(address: str, **kw) -> str:
        async with AsyncClient(address, timeout=0.8, grace=0.2, **kw) as c:
            with pytest.raises(Timeout) as exc:
                await c.infer("mlp", X)
            return str(exc.value)

    msg = asyncio.run(main(cluster.frontend))
    assert f"no answer from {cluster.frontend}" in msg and "requires CURVE keys" in msg
    nobody = f"tcp://127.0.0.1:{free_port()}"
    msg = asyncio.run(main(nobody))
    assert f"no answer from {nobody}" in msg and "no connection could be made" in msg


def test_a_rate_limited_answer_keeps_the_masters_retry_hint():
    from ringserve.client.errors import Overloaded, from_error
    from ringserve.gateway.errors import from_ringserve

    exc = from_error({"code": "OVERLOADED", "message": "rate limit"}, "r1", 2.2)
    assert isinstance(exc, Overloaded) and exc.retry_after_s == 2.2
    assert from_ringserve(exc).retry_after == 3  # Retry-After in whole seconds, rounded up
    for odd in (float("nan"), -1, 1e9, "2", True, None):
        assert from_error({"code": "OVERLOADED", "message": "x"}, "r", odd).retry_after_s is None
    assert from_ringserve(from_error({"code": "WORKER_LOST", "message": "x"}, "r")).retry_after == 1
