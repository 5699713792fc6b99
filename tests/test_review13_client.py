"""Review of issue 22's coalesced client path (review13): a client's batch never goes beyond what a
master takes in one message (MAX_CLIENT_BATCH requests), whatever batch_max it was given; a master
refuses such a batch whole, with no id, so none of its requests would ever be answered."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ringserve.client import AsyncClient
from ringserve.client.errors import Timeout
from ringserve.protocol.envelope import MAX_CLIENT_BATCH

pytestmark = pytest.mark.timeout(120)


def test_a_batch_max_beyond_the_masters_bound_still_gets_every_request_answered(cluster):
    cluster.start_master("--max-queue", "5000")
    cluster.start_workers(1, model="echo=ringserve.worker.demo:slow,arg.delay=0")
    n = MAX_CLIENT_BATCH + 200

    async def run():
        async with AsyncClient(cluster.frontend, timeout=15, retry_interval=60.0,  # no resend: the first send counts
                               batch_max=4 * MAX_CLIENT_BATCH) as ac:
            await ac.infer("echo", {"x": np.ones((1, 4), np.float32)})  # connected, epoch known
            got = await asyncio.gather(*(ac.infer("echo", {"x": np.full((1, 4), float(i), np.float32)})
                                         for i in range(n)), return_exceptions=True)
            return got, ac.stats.batches_sent

    got, batches = asyncio.run(run())
    assert not [g for g in got if isinstance(g, Timeout)], "requests of a refused batch were never answered"
    assert [g["y"][0, 0] for g in got] == [float(i) for i in range(n)]
    assert batches > 0


@pytest.mark.parametrize("model", ["", "m" * 129, "mmi.service", "mmi.batch2"])
def test_a_model_name_no_master_takes_is_refused_at_submit_not_timed_out(cluster, model):
    """A master answers a request for such a name with no id (an empty or long name: BAD_REQUEST
    before the id is read) or as an RFC 8 service ("mmi.*": a bare 501, which a batching client even
    takes for a master that cannot batch), so the request could only time out: refused at once."""
    cluster.start_master()

    async def run():
        async with AsyncClient(cluster.frontend, timeout=3) as ac:
            with pytest.raises(ValueError, match="model name"):
                ac.submit(model, {"x": np.ones((1, 4), np.float32)})
            assert not ac._rel.pending

    asyncio.run(run())
    from ringserve.client import Client

    with Client(cluster.frontend, timeout=3) as c:
        with pytest.raises(ValueError, match="model name"):
            c.infer_async(model, {"x": np.ones((1, 4), np.float32)})
