"""ringserve-gateway: the Open Inference Protocol (KServe v2) over HTTP in front of the masters.

Stateless: it holds no request state beyond what is in flight, so any number of gateways can
stand in front of the master(s). It talks to a master with ringserve's own ``AsyncClient``
(client/aio.py) in the same event loop as the HTTP server, and reads the master's admin status
(a poll, once per `--status-interval`) for health and model metadata; the master's loop does
nothing for the gateway that it would not do for any other client. See docs/gateway.md.
"""
