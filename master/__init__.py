"""The master: one event loop that schedules client requests onto workers.

broker.py holds the loop and the protocol events; scheduler.py the policies; liveness.py
the heartbeat arithmetic; registry.py the worker and request records; status.py the admin view.
"""
