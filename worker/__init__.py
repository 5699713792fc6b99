"""The worker: runs models for the master.

agent.py is the socket thread (master connection, heartbeats, reconnects); compute.py the
compute thread; batching.py the pure batch-forming policy; loader.py how a model is built,
weighted, cast and checked; demo.py the models shipped for the demo and the tests.
"""
