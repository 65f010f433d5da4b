"""Where a training step spends its time: torch.profiler over a window of steps, summed up
per step (wall time, operators dispatched, GPU kernel launches) with the costliest
operators, and a Chrome trace (open in Perfetto or chrome://tracing)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from cifar_exp.training.step import synchronize

# The runtime calls that start work on a GPU: one per kernel, or one per CUDA graph replay.
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
            "cudaLaunchCooperativeKernel", "cudaGraphLaunch")
TOP_OPERATORS = 12


@dataclass
class StepProfile:
    steps: int
    ms_per_step: float  # wall time, the device waited for
    operators_per_step: float  # aten operators not called from inside another operator
    launches_per_step: float | None  # GPU kernel launches and graph replays; None on the CPU
    table: str  # the costliest operators by self time (device time on a GPU)
    trace: Path


class WindowProfiler:
    """Profiles from `start()` to `stop()`, on the CPU and, for a GPU device, on the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._profiler = profile(activities=activities)
        self._started = 0.0
        self.seconds = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._profiler.start()
        self._started = time.perf_counter()

    def stop(self) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._started
        self._profiler.stop()

    def summary(self, steps: int, trace: Path) -> StepProfile:
        """Per-step figures over the `steps` profiled; writes the Chrome trace to `trace`."""
        events = self._profiler.events()
        operators = sum(1 for event in events if _is_dispatched_operator(event))
        launches = sum(1 for event in events if event.name in LAUNCHES)
        on_gpu = self.device.type == "cuda"
        table = self._profiler.key_averages().table(
            sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total",
            row_limit=TOP_OPERATORS)
        trace.parent.mkdir(parents=True, exist_ok=True)
        self._profiler.export_chrome_trace(str(trace))
        return StepProfile(steps, 1000 * self.seconds / steps, operators / steps,
                           launches / steps if on_gpu else None, table, trace)


def _is_dispatched_operator(event) -> bool:
    """An aten operator called by Python, by autograd or by an optimizer, not one that
    another operator calls in its implementation: each costs a trip through the
    dispatcher, and in eager mode on a GPU usually a kernel launch."""
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    return parent is None or not parent.name.startswith("aten::")
