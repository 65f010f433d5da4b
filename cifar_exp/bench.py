"""Throughput of the framework's training step against the bare model step.

    python -m cifar_exp.bench [overrides] [--windows N] [--window-steps N] [--json FILE]

(a) the bare model step: forward, loss, backward and optimizer step on random tensors
    already on the device -- the ceiling for this model, batch size and device;
(b) the framework's full step: sampling, augmentation, model, optimizer, metric bookkeeping
    and MLflow logging, as `python -m cifar_exp.run` trains; and the same step with
    tracking off, whose difference is the cost of logging to MLflow.
Each is timed over windows of steps after a warm-up window; the three are measured twice,
interleaved, and medians are reported."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cifar_exp.build import build_experiment, resolve_device
from cifar_exp.config import compose_config, validate
from cifar_exp.data import CifarData, load_cifar
from cifar_exp.models import regularization_loss
from cifar_exp.tracking import RunTracker
from cifar_exp.train import TrainSettings, train


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step_rates(cfg, data: CifarData, windows: int, window_steps: int) -> list[float]:
    """Examples/sec of forward+backward+step on fixed random tensors, one per window."""
    experiment = build_experiment(cfg, data)
    model, optimizer = experiment.model, experiment.optimizer
    device = data.train_images.device
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format).train()
    size = experiment.augmentation.image_size
    inputs = torch.randn(cfg.batch_size, 3, size, size, device=device)
    inputs = inputs.contiguous(memory_format=memory_format)
    labels = torch.randint(0, data.num_classes, (cfg.batch_size,), device=device)
    rates = []
    for window in range(windows + 1):  # the first window warms up
        _sync(device)
        start = time.perf_counter()
        for _ in range(window_steps):
            loss = F.cross_entropy(model(inputs), labels) + regularization_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync(device)
        if window:
            rates.append(window_steps * cfg.batch_size / (time.perf_counter() - start))
    return rates


class _RateRecorder:
    """Passes metrics on to MLflow (or nowhere), keeps the examples/sec of each log window
    and the time spent inside MLflow calls."""

    def __init__(self, tracker: RunTracker | None) -> None:
        self.tracker = tracker
        self.rates: list[tuple[int, float]] = []
        self.logging_seconds = 0.0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "examples_per_sec" in metrics:
            self.rates.append((step, metrics["examples_per_sec"]))
        if self.tracker is not None:
            start = time.perf_counter()
            self.tracker.log_metrics(metrics, step)
            self.logging_seconds += time.perf_counter() - start


@dataclass
class FrameworkTiming:
    rates: list[float]  # examples/sec per log window after the warm-up
    train_seconds: float
    logging_seconds: float  # inside MLflow calls, the final flush included


def framework_step_rates(cfg, data: CifarData, windows: int, window_steps: int,
                         tracking: bool = True) -> FrameworkTiming:
    """Time the real training loop, as it logs every `log_every` steps, after a warm-up
    of `window_steps` steps."""
    experiment = build_experiment(cfg, data)
    steps = (windows + 1) * window_steps
    settings = TrainSettings(steps=steps, batch_size=cfg.batch_size, seed=cfg.seed,
                             log_every=cfg.log_every, eval_every=steps,
                             eval_batch_size=cfg.eval_batch_size,
                             channels_last=cfg.channels_last, progress=False)
    with tempfile.TemporaryDirectory() as folder:
        store = f"sqlite:///{folder}/bench.db"
        with RunTracker(store, "bench", "bench") if tracking else nullcontext() as tracker:
            recorder = _RateRecorder(tracker)
            result = train(experiment.model, experiment.optimizer, experiment.scheduler,
                           experiment.augmentation, data, settings, recorder, experiment.ema)
            if tracker is not None:
                start = time.perf_counter()
                tracker.flush()
                recorder.logging_seconds += time.perf_counter() - start
    rates = [rate for step, rate in recorder.rates if step > window_steps]
    return FrameworkTiming(rates, result.train_seconds, recorder.logging_seconds)


def measure(overrides: Sequence[str], windows: int = 5, window_steps: int = 20) -> dict:
    """Run the comparison and return its figures."""
    cfg = compose_config(overrides)
    validate(cfg)
    device = resolve_device(cfg.device)
    data = load_cifar(cfg.data.name, cfg.data.root, cfg.data.download).to(device)
    bare: list[float] = []
    tracked: list[FrameworkTiming] = []
    untracked: list[FrameworkTiming] = []
    for _ in range(2):  # interleaved, so that drift in the machine's speed hits all three
        bare += bare_step_rates(cfg, data, windows, window_steps)
        tracked.append(framework_step_rates(cfg, data, windows, window_steps))
        untracked.append(framework_step_rates(cfg, data, windows, window_steps, False))
    bare_rate = statistics.median(bare)
    framework_rate = statistics.median([rate for timing in tracked for rate in timing.rates])
    untracked_rate = statistics.median([rate for timing in untracked for rate in timing.rates])
    logging_share = (sum(t.logging_seconds for t in tracked)
                     / sum(t.train_seconds for t in tracked))
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "overrides": list(overrides),
        "model": cfg.model.name,
        "batch_size": cfg.batch_size,
        "windows": windows,
        "window_steps": window_steps,
        "bare_examples_per_sec": bare_rate,
        "framework_examples_per_sec": framework_rate,
        "framework_over_bare": framework_rate / bare_rate,
        "untracked_examples_per_sec": untracked_rate,
        "tracking_overhead": 1 - framework_rate / untracked_rate,
        "logging_share": logging_share,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as for cifar_exp.run")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per measurement")
    parser.add_argument("--window-steps", type=int, default=20, help="steps per window")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    figures = measure(args.overrides, args.windows, args.window_steps)
    print(f"device {figures['device']}, torch {figures['torch']}, {figures['threads']} threads, "
          f"{figures['model']}, batch {figures['batch_size']}")
    print(f"(a) bare model step   {figures['bare_examples_per_sec']:10.1f} examples/sec")
    print(f"(b) framework step    {figures['framework_examples_per_sec']:10.1f} examples/sec"
          f"   b/a = {figures['framework_over_bare']:.3f}")
    print(f"    without tracking  {figures['untracked_examples_per_sec']:10.1f} examples/sec"
          f"   {100 * figures['tracking_overhead']:+.1f}% with tracking")
    print(f"time inside MLflow calls: {100 * figures['logging_share']:.2f}% of training time")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
