"""The ringserve client library: Client for inference, AdminClient for the status socket."""
from client.errors import (BadRequest, Internal, Overloaded, RingserveError, Timeout, UnknownModel,
                           UnknownVersion, WorkerLost)
from client.inference import Client, Reply

__all__ = ["Client", "Reply", "RingserveError", "BadRequest", "UnknownModel", "UnknownVersion",
           "Overloaded", "Timeout", "WorkerLost", "Internal"]
