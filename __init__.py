"""ringserve: model serving over ZeroMQ.

Everything installs under this one import name. The repository keeps one folder per part
(`protocol/`, `master/`, `worker/`, `paramserver/`, `client/`, `launch/`); setup.cfg maps
them to `ringserve.protocol`, `ringserve.master`, ... so no bare `client` or `master` is
ever installed. The client API is re-exported here lazily (``from ringserve import Client``)
so that importing a server role does not pull in the client; so is `Security` (how a
process's sockets are secured: ``Security(keys_dir, role, name)``, from `protocol/security.py`),
which every client and the admin and publisher clients take as ``security=``.
"""
from __future__ import annotations

__version__ = "0.1.0"

_CLIENT_NAMES = {"Client", "AsyncClient", "Reply", "RingserveError", "BadRequest", "UnknownModel", "UnknownVersion",
                 "Overloaded", "Timeout", "WorkerLost", "Internal", "AdminClient"}

_SECURITY_NAMES = {"Security", "SecurityError"}

__all__ = sorted(_CLIENT_NAMES | _SECURITY_NAMES)


def __getattr__(name: str):
    if name in _SECURITY_NAMES:
        from ringserve.protocol import security
        return getattr(security, name)
    if name in _CLIENT_NAMES:
        if name == "AdminClient":
            from ringserve.client.admin import AdminClient
            return AdminClient
        from ringserve import client
        return getattr(client, name)
    raise AttributeError(f"module 'ringserve' has no attribute {name!r}")
