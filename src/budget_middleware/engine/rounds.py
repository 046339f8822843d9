"""How the background loops (the flusher, the alerts' deliveries) tell their rounds failing:
the store away fails every round, one a flush or poll interval, and a traceback each time is
noise that hides the first."""

from __future__ import annotations

import logging

logger = logging.getLogger("budget_middleware")


class FailedRounds:
    """The rounds of one loop failing in a row: the first failure's traceback (and again when
    what fails changes), a line at the 10th, 100th and every 1,000th, and one when a round
    succeeds again."""

    __slots__ = ("count", "kind", "loop")

    def __init__(self, loop: str) -> None:
        self.loop = loop  # "flusher", "alert"
        self.count = 0
        self.kind = ""  # what the last failure raised

    def failed(self, exc: Exception) -> None:
        kind = type(exc).__name__
        self.count += 1
        n = self.count
        if n == 1 or kind != self.kind:
            logger.exception("budget-middleware %s round failed", self.loop)
        elif n in (10, 100) or n % 1000 == 0:
            logger.warning(
                "budget-middleware %s rounds failed %d times in a row (the last: %s: %s)",
                self.loop,
                n,
                kind,
                exc,
            )
        self.kind = kind

    def succeeded(self) -> None:
        if self.count:
            logger.warning(
                "budget-middleware %s rounds succeed again, after %d that failed",
                self.loop,
                self.count,
            )
            self.count = 0
