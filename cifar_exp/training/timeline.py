"""Where a job's wall time goes: start-up, data, build, tracking, training steps,
evaluation, checkpoints, model logging and the rest, so that the time a run takes end to end
can be read off, not guessed (a long run's minutes are not all training)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from cifar_exp.world import interpreter_seconds

# The phases in the order a job goes through them; `other` is what none of them holds.
PHASES = ("startup", "data", "build", "tracking", "training", "evaluation", "checkpoints",
          "model_logging", "other")

# What a run records of its timeline: the total as its one metric (a single point, so one
# chart, not one per phase), the split as a small table.
TOTAL_METRIC = "seconds"
TABLE_ARTIFACT = "timeline.csv"

# The first job of a process also owns the interpreter's start-up (imports, config
# composition); a sweep's later jobs in the same process start with none.
_startup_claimed = False
_claim_lock = threading.Lock()


def _claim_startup() -> float:
    """Seconds since this interpreter started, for its first job; 0 for the others."""
    global _startup_claimed
    with _claim_lock:
        first, _startup_claimed = not _startup_claimed, True
    return max(interpreter_seconds(), 0.0) if first else 0.0


class Timeline:
    """Seconds per phase of one job, from its start (and its interpreter's, for the
    first)."""

    def __init__(self, startup: float = 0.0) -> None:
        self._start = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES[:-1], 0.0)
        self.seconds["startup"] = startup

    @classmethod
    def for_job(cls) -> Timeline:
        """A timeline that starts now, with the process's start-up if no job claimed it."""
        return cls(_claim_startup())

    def add(self, phase: str, seconds: float) -> None:
        if phase not in self.seconds:
            raise ValueError(f"unknown phase {phase!r}; one of {', '.join(PHASES[:-1])}")
        self.seconds[phase] += seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the time inside the block towards `name`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def breakdown(self) -> dict[str, float]:
        """Seconds per phase so far, `other` included, and their sum as `total`."""
        total = self.seconds["startup"] + time.perf_counter() - self._start
        other = max(total - sum(self.seconds.values()), 0.0)
        return {**self.seconds, "other": other, "total": total}

    def table(self) -> str:
        """The breakdown as CSV: a `phase,seconds` row per phase, then `total`."""
        rows = [f"{phase},{seconds:.3f}" for phase, seconds in self.breakdown().items()]
        return "\n".join(["phase,seconds", *rows]) + "\n"

    def summary(self) -> str:
        """One line: the total, then each phase that rounds to 0.1 s or more."""
        breakdown = self.breakdown()
        total = breakdown.pop("total")
        parts = [f"{phase.replace('_', ' ')} {seconds:.1f} s"
                 for phase, seconds in breakdown.items() if seconds >= 0.05]
        return f"{total:.1f} s in all: {', '.join(parts)}"
