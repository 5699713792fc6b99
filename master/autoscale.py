"""How many workers a model wants: a pure policy, after Ray Serve's autoscaler.

The master exports the figure as ``ringserve_desired_workers{model}`` (with
``ringserve_ongoing_requests_per_worker{model}``); a HorizontalPodAutoscaler follows it
(deploy/autoscale, docs/deployment.md "Autoscaling"), so the policy lives in one tested place
and the HPA does no arithmetic of its own.

The model is Ray Serve's ``target_ongoing_requests``: a model with ``ongoing`` requests (queued
at the master plus in flight at its workers) wants ``ceil(ongoing / target)`` workers, within
``[min_workers, max_workers]``. A change is adopted only once the proposal has pointed the same
way for ``upscale_delay_s`` (up) or ``downscale_delay_s`` (down), measured on the clock passed
in; a proposal that flips direction or returns to the current figure restarts the wait. So a
burst does not buy workers it no longer needs by the time they start, and a lull does not drain
workers the next burst needs. One exception, as in Ray Serve: a model with requests and no
worker at all gets one at once (waiting would only make its requests time out).

Everything is a function of its arguments (the ongoing count, the worker count, the clock and
the previous decision), so it is tested without processes or sleeps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AutoscalePolicy:
    target_ongoing_requests: float = 2.0  # Ray Serve's default
    min_workers: int = 1
    max_workers: int = 64
    upscale_delay_s: float = 30.0  # Ray Serve's defaults
    downscale_delay_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.target_ongoing_requests > 0:
            raise ValueError("target_ongoing_requests must be > 0")
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError("need 0 <= min_workers <= max_workers")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("delays must be >= 0")

    def proposal(self, ongoing: int) -> int:
        """Workers the load asks for right now, before any delay."""
        wanted = math.ceil(max(0, ongoing) / self.target_ongoing_requests)
        return min(self.max_workers, max(self.min_workers, wanted))


@dataclass(frozen=True)
class Decision:
    """What the policy said last: the figure in force, and a pending change (direction and since when)."""

    desired: int
    direction: int = 0  # +1: an upscale is waiting out its delay; -1: a downscale is; 0: none
    since: float | None = None


def decide(policy: AutoscalePolicy, ongoing: int, workers: int, now: float, prev: Decision | None) -> Decision:
    """The desired worker count for one model. `workers` is how many serve it now (the starting
    figure when there is no previous decision)."""
    proposal = policy.proposal(ongoing)
    if prev is None:
        prev = Decision(min(policy.max_workers, max(policy.min_workers, workers)))
    if ongoing > 0 and workers == 0 and prev.desired == 0:
        return Decision(max(1, proposal))  # from zero at once
    if proposal == prev.desired:
        return Decision(prev.desired)
    direction = 1 if proposal > prev.desired else -1
    since = prev.since if prev.direction == direction and prev.since is not None else now
    delay = policy.upscale_delay_s if direction > 0 else policy.downscale_delay_s
    if now - since >= delay:
        return Decision(proposal)
    return Decision(prev.desired, direction, since)


def ongoing_per_worker(ongoing: int, workers: int) -> float:
    """The gauge dashboards show next to the figure (ongoing / workers; all of it when none)."""
    return float(ongoing) / workers if workers else float(ongoing)
