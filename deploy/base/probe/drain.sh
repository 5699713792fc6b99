#!/bin/sh
# preStop for workers (and the master): drain, then let Kubernetes finish the stop.
# SIGTERM makes a worker drain (the master stops sending it work, it answers what it holds and
# leaves) and the master stop taking requests and answer what it holds within --drain-timeout.
# This waits, at most DRAIN_TIMEOUT seconds, for the process (PID 1 of the container) to finish;
# terminationGracePeriodSeconds is longer than DRAIN_TIMEOUT, so the kubelet's own SIGTERM/SIGKILL
# never cuts a drain short.
kill -TERM 1 2>/dev/null
limit=$(( ${DRAIN_TIMEOUT:-30} * 10 ))
i=0
while kill -0 1 2>/dev/null && [ "$i" -lt "$limit" ]; do
  sleep 0.1
  i=$((i + 1))
done
exit 0
