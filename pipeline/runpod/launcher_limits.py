"""The run's limits as the launcher enforces them: spend, the first shard's deadline,
the deadline between shards, and runtime.

The pod's watchdog enforces the same limits from inside, but a pod whose container
never starts it (a crash loop, a wrong image, an entrypoint that dies before Python)
bills until someone ends it. So the launcher counts too, from the ledger (each pod's
own billed price) and the shards published, and ends the pods itself. Plain and
clocked from outside, so every limit is tested without waiting for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from pipeline.settings import default


@dataclass
class RunLimits:
    max_dollars: float  # the whole run's, every pod's together
    first_shard_seconds: float = default("first_shard_seconds")  # from a pod running to the first shard it (or any) makes
    idle_seconds: float = default("idle_seconds")  # between two shards
    max_seconds: float = default("watchdog_max_seconds")  # a pod's runtime, from its creation
    poll_seconds: float = default("poll_seconds")  # how often the launcher looks: spend is judged one look ahead


class RunGuard:
    """Tells the launcher, at each look, whether a limit is passed and why (one line)."""

    def __init__(self, limits: RunLimits, clock: Callable[[], float] = time.time):
        self.limits, self.clock = limits, clock
        self.shards: Optional[int] = None
        self.waiting_since: Optional[float] = None  # since a pod started running or the last shard
        self.shard_since_running = False
        self.pods: dict[str, tuple[float, bool]] = {}  # pod -> (waiting since, made a shard)
        self.last_look: Optional[float] = None  # when the spend was last judged
        self.longest_look = 0.0  # the longest time between two judgements yet (API retries, a slow terminate)

    def pod_running(self, pod_id: Optional[str] = None) -> None:
        """A pod's container runs: the first-shard deadline starts now (the run's, and
        the pod's own)."""
        self.waiting_since, self.shard_since_running = self.clock(), False
        if pod_id:
            self.pods[pod_id] = (self.clock(), False)

    def saw_pod_shards(self, pod_ids) -> None:
        """Shards that say which pod made them (their ``pod_id``)."""
        for pod_id in pod_ids:
            if pod_id in self.pods:
                self.pods[pod_id] = (self.clock(), True)

    def stalled(self, live: list[str]) -> list[tuple[str, str]]:
        """With several pods, those past their own deadline while others work: (pod,
        reason). One pod alone is the run, whose deadlines ``breach`` tells."""
        if len(live) < 2:
            return []
        now, found = self.clock(), []
        for pod_id in live:
            since, made = self.pods.get(pod_id, (None, False))
            if since is None:
                continue
            if not made and now - since > self.limits.first_shard_seconds:
                found.append((pod_id, f"pod {pod_id} made no shard within {self.limits.first_shard_seconds:g}s of running (--first-shard-seconds)"))
            elif made and now - since > self.limits.idle_seconds:
                found.append((pod_id, f"pod {pod_id} made no new shard for {self.limits.idle_seconds:g}s (--idle-seconds)"))
        return found

    def saw_shards(self, count: int) -> None:
        if self.shards is not None and count > self.shards:
            self.waiting_since, self.shard_since_running = self.clock(), True
        self.shards = count if self.shards is None else max(self.shards, count)

    def deadline_in(self) -> Optional[tuple[str, float]]:
        """(which deadline, seconds left) while a shard is awaited."""
        if self.waiting_since is None:
            return None
        if self.shard_since_running:
            return "next shard", self.waiting_since + self.limits.idle_seconds - self.clock()
        return "first shard", self.waiting_since + self.limits.first_shard_seconds - self.clock()

    def over_budget(self, spent: float, dollars_per_hour: float) -> Optional[str]:
        """The spend is judged one look ahead: the pods are ended before the run's spend
        can pass ``max_dollars``, not a poll interval after. A look is the poll interval, or
        the longest time yet between two judgements if that was longer: API calls retried
        with backoff, or a slow terminate, stretch it."""
        now = self.clock()
        if self.last_look is not None:
            self.longest_look = max(self.longest_look, now - self.last_look)
        self.last_look = now
        ahead = spent + dollars_per_hour * max(self.limits.poll_seconds, self.longest_look) / 3600
        if ahead >= self.limits.max_dollars:
            return (f"spend limit: ${spent:.4f} spent of --max-dollars {self.limits.max_dollars:g}, this output's "
                    f"over all its launches (${dollars_per_hour:.3f}/h would pass it before the next look)")
        return None

    def breach(self, spent: float, dollars_per_hour: float, oldest_created: Optional[float] = None,
               shard_deadlines: bool = True) -> Optional[str]:
        """The first limit passed, as a one-line reason, or None. ``shard_deadlines``
        False: no pod is running to make shards (one is being looked for or starting)."""
        reason = self.over_budget(spent, dollars_per_hour)
        if reason:
            return reason
        now = self.clock()
        if oldest_created is not None and now - oldest_created > self.limits.max_seconds:
            return f"runtime limit: a pod ran {now - oldest_created:.0f}s, past {self.limits.max_seconds:g}s"
        waiting = self.deadline_in() if shard_deadlines else None
        if waiting and waiting[1] < 0:
            if waiting[0] == "first shard":
                return f"no shard within {self.limits.first_shard_seconds:g}s of the pod running (--first-shard-seconds)"
            return f"no new shard for {self.limits.idle_seconds:g}s (--idle-seconds)"
        return None
