"""Retry, quarantine and probation policies: small pure functions of counts and time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How often a task may stall or kill its worker before it is quarantined, and how long it waits.

    ``budget`` counts *crashes* (its satellite was lost while running it, it stopped reporting
    progress, it was never started, or its worker process died under it). A task raising an
    exception is not a crash: it fails at once, with its error, and is not retried.
    """

    budget: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0

    def quarantine(self, crashes: int) -> bool:
        """Whether a task with ``crashes`` crashes so far must be quarantined."""
        return crashes >= self.budget

    def delay(self, crashes: int) -> float:
        """Seconds to wait before the next attempt: exponential back-off, capped."""
        if crashes <= 0 or self.backoff <= 0:
            return 0.0
        return min(self.max_backoff, self.backoff * 2 ** (crashes - 1))


@dataclass(frozen=True)
class ProbationPolicy:
    """When a satellite whose tasks keep failing gets fewer credits, then none.

    ``streak`` is the number of consecutive tasks that failed or crashed on the satellite
    (a success resets it).
    """

    demote_after: int = 5
    drain_after: int = 10
    promote_after: int = 3

    def demote(self, streak: int) -> bool:
        """Whether to put a satellite on probation."""
        return self.demote_after > 0 and streak >= self.demote_after

    def drain(self, streak: int) -> bool:
        """Whether a satellite on probation stops getting tasks."""
        return self.drain_after > 0 and streak >= self.drain_after

    def promote(self, successes: int) -> bool:
        """Whether a satellite on probation gets its full credit back."""
        return successes >= self.promote_after

    @staticmethod
    def credits(slots: int) -> int:
        """Credits of a satellite on probation: half, at least one."""
        return max(1, slots // 2)
