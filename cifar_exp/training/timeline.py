"""Where a job's wall time goes: start-up, data, build, tracking, training steps,
evaluation, checkpoints, model logging and the rest, so that the time a run takes end to end
can be read off, not guessed (a long run's minutes are not all training)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import psutil

# The phases in the order a job goes through them; `other` is what none of them holds.
PHASES = ("startup", "data", "build", "tracking", "training", "evaluation", "checkpoints",
          "model_logging", "other")

# The first job of a process also owns the process's start-up (interpreter, imports, config
# composition); a sweep's later jobs in the same process start with none.
_startup_claimed = False
_claim_lock = threading.Lock()


def _claim_startup() -> float:
    """Seconds since this process started, for its first job; 0 for the others."""
    global _startup_claimed
    with _claim_lock:
        first, _startup_claimed = not _startup_claimed, True
    return max(time.time() - psutil.Process().create_time(), 0.0) if first else 0.0


class Timeline:
    """Seconds per phase of one job, from its start (and its process's, for the first)."""

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

    def metrics(self) -> dict[str, float]:
        """The breakdown as MLflow metrics: `seconds/<phase>` and `seconds/total`."""
        return {f"seconds/{phase}": value for phase, value in self.breakdown().items()}

    def summary(self) -> str:
        """One line: the total, then each phase that rounds to 0.1 s or more."""
        breakdown = self.breakdown()
        total = breakdown.pop("total")
        parts = [f"{phase.replace('_', ' ')} {seconds:.1f} s"
                 for phase, seconds in breakdown.items() if seconds >= 0.05]
        return f"{total:.1f} s in all: {', '.join(parts)}"
