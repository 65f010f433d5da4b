"""Jobs per hour of one sweep run several ways: its N jobs one after another (Hydra's basic
launcher), packed as one stacked step (hydra/launcher=packed, mode=stacked), packed as
processes sharing the device (mode=processes), and as Ray tasks (hydra/launcher=ray, with
the `ray` extra installed; an eighth of a GPU each where there is one).

    python -m cifar_exp.bench --sweep N [overrides] [--modes sequential,stacked,processes,ray]

Each way is the real command, `python -m cifar_exp.run -m seed=0,...,N-1 [overrides]`, in
a fresh folder with its own MLflow store, timed end to end (start-up, data, training,
evaluations, checkpoints, logging, the sweep report): what a user waits for. The jobs'
final precisions are read back from the store."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

MODES = {"sequential": (), "stacked": ("hydra/launcher=packed", "hydra.launcher.mode=stacked"),
         "processes": ("hydra/launcher=packed", "hydra.launcher.mode=processes"),
         # Ray's processes (pip install -e '.[ray]'), 8 jobs to a GPU where there is one.
         "ray": ("hydra/launcher=ray",)}
RAY_GPU_SHARE = "+hydra.launcher.ray.remote.num_gpus=0.125"


@dataclass
class SweepTiming:
    mode: str
    jobs: int
    seconds: float
    precisions: list[float]

    @property
    def jobs_per_hour(self) -> float:
        return self.jobs / self.seconds * 3600


def sweep_command(jobs: int, mode: str, overrides: Sequence[str], uri: str) -> list[str]:
    """The multirun of `jobs` seeds under `mode`, tracked to `uri`."""
    import torch

    seeds = ",".join(str(seed) for seed in range(jobs))
    gpu_share = (RAY_GPU_SHARE,) if mode == "ray" and torch.cuda.is_available() else ()
    return [sys.executable, "-m", "cifar_exp.run", "-m", f"seed={seeds}", *MODES[mode],
            *gpu_share, *overrides, f"tracking.uri={uri}", "tracking.experiment=sweep_bench"]


def time_sweep(jobs: int, mode: str, overrides: Sequence[str]) -> SweepTiming:
    """Run the sweep in a fresh folder and time it; refuses a sweep that did not finish."""
    with tempfile.TemporaryDirectory(prefix=f"sweep-{mode}-") as folder:
        uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        start = time.perf_counter()
        done = subprocess.run(sweep_command(jobs, mode, overrides, uri), cwd=folder,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"the {mode} sweep exited {done.returncode}: {last}")
        return SweepTiming(mode, jobs, seconds, precisions(uri))


def precisions(uri: str) -> list[float]:
    """The final precision of every job run (not the sweep's parent) in the store."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep_bench")
    runs = client.search_runs([experiment.experiment_id])
    return [run.data.metrics.get("precision", math.nan) for run in runs
            if run.data.tags.get("sweep") != "parent"]


def markdown_table(timings: Sequence[SweepTiming]) -> str:
    """One row per way, with its jobs/hour against the first (one after another)."""
    baseline = timings[0].jobs_per_hour
    rows = ["| launcher | jobs | wall s | jobs/hour | ratio | precision (mean ± std) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for timing in timings:
        values = timing.precisions
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(f"| {timing.mode} | {timing.jobs} | {timing.seconds:.1f} | "
                    f"{timing.jobs_per_hour:.0f} | {timing.jobs_per_hour / baseline:.2f}x | "
                    f"{statistics.fmean(values):.4f} ± {spread:.4f} |")
    return "\n".join(rows)


def run(jobs: int, modes: Sequence[str], overrides: Sequence[str]) -> str:
    """Time the sweep each way (in `modes`' order) and return the table."""
    if jobs < 1:
        raise ValueError(f"--sweep {jobs}: give the number of jobs, at least 1")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise ValueError(f"--modes {','.join(unknown)}: choose from {', '.join(MODES)}")
    timings = []
    for mode in modes:
        print(f"timing {jobs} jobs, {mode} ...", file=sys.stderr, flush=True)
        timings.append(time_sweep(jobs, mode, overrides))
    return markdown_table(timings)
