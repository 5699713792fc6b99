"""The ringserve client library: Client (threads) and AsyncClient (asyncio) for inference, AdminClient
for the status socket."""
from ringserve.client.errors import (BadRequest, ConfigError, Internal, Overloaded, RingserveError, Timeout,
                                     UnknownModel, UnknownVersion, WorkerLost)
from ringserve.client.aio import AsyncClient
from ringserve.client.inference import Client, Reply

__all__ = ["Client", "AsyncClient", "Reply", "RingserveError", "BadRequest", "UnknownModel", "UnknownVersion",
           "Overloaded", "Timeout", "WorkerLost", "Internal", "ConfigError"]
