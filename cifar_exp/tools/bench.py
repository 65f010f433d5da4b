"""Throughput of the framework's training step against the bare model step and against
the usual DataLoader pipeline.

    python -m cifar_exp.bench [overrides] [--windows N] [--window-steps N] [--workers 0,2]
                              [--bare-only | --profile FOLDER] [--json FILE]
    python -m cifar_exp.bench --sweep N [overrides] [--modes sequential,stacked,processes,ray]

(a) the bare model step: forward, loss, backward and optimizer step on random tensors
    already on the device -- the ceiling for this model, batch size and device;
(b) the framework's full step: sampling, augmentation, model, optimizer, metric bookkeeping
    and MLflow logging, as `python -m cifar_exp.run` trains; and the same step with
    tracking off, whose difference is the cost of logging to MLflow;
(c) the pipeline a user would otherwise write: a map-style Dataset over the same uint8
    arrays, the augmentation's torchvision.transforms.v2 equivalent, and a DataLoader
    (worker counts swept, pinned memory on a GPU) feeding the same step.
All three share the trainer's step function and speed options. Each is timed over
windows of steps after a warm-up window, (a) and (b) twice, interleaved; medians are
reported."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from cifar_exp.config import compose_config, validate
from cifar_exp.data import CifarData, load_cifar
from cifar_exp.tools import sweep_bench
from cifar_exp.tools.loader_baseline import ArrayDataset, endless_batches, per_image_transform
from cifar_exp.tools.profiling import StepProfile, WindowProfiler
from cifar_exp.tracking.runs import RunTracker
from cifar_exp.training.batches import BatchMaker
from cifar_exp.training.build import build_parts, build_settings, device_name, resolve_device
from cifar_exp.training.loop import StopCheck, TrainResult, train
from cifar_exp.training.parts import Parts
from cifar_exp.training.step import TrainingStep, memory_format, synchronize


def _timed_windows(one_step: Callable[[], object], device: torch.device, batch_size: int,
                   windows: int, window_steps: int) -> list[float]:
    """Examples/sec of `one_step` per window, after one warm-up window."""
    rates = []
    for window in range(windows + 1):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(window_steps):
            one_step()
        synchronize(device)
        if window:
            rates.append(window_steps * batch_size / (time.perf_counter() - start))
    return rates


ModelStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs, labels) -> loss


def _model_step(cfg: DictConfig, data: CifarData) -> tuple[ModelStep, Parts]:
    """A fresh model and optimizer from `cfg`, behind the trainer's own model step (forward,
    loss, backward, optimizer) with the run's speed options, on batches made outside it: op
    by op, or replayed as a CUDA graph under `cuda_graph`, each batch copied in."""
    parts = build_parts(cfg, data)
    settings = parts.settings
    device = data.train_images.device
    layout = memory_format(settings.channels_last)
    parts.model.to(memory_format=layout).train()
    # The trainer's step is built with its data path; what is timed here is its model step.
    batches = BatchMaker(data, parts.augmentation,
                         torch.Generator(device).manual_seed(settings.seed), layout)
    step = TrainingStep(parts.model, parts.optimizer, batches, device, amp=settings.amp,
                        compile_mode=settings.compile, label_smoothing=settings.label_smoothing,
                        cuda_graph=settings.cuda_graph)
    eager, graphs = step.eager, step.graphs
    if graphs is None:
        return eager, parts
    return (lambda inputs, labels: graphs("made batch", eager, (inputs, labels))), parts


def bare_step_rates(cfg: DictConfig, data: CifarData, windows: int,
                    window_steps: int) -> list[float]:
    """(a) The step alone, on fixed random tensors already on the device."""
    bare_step = _bare_step(cfg, data)
    return _timed_windows(bare_step, data.train_images.device, cfg.batch_size, windows,
                          window_steps)


def _bare_step(cfg: DictConfig, data: CifarData) -> Callable[[], torch.Tensor]:
    """The trainer's model step on a fixed batch of random tensors on the device."""
    step, parts = _model_step(cfg, data)
    device = data.train_images.device
    size = parts.augmentation.image_size
    inputs = torch.randn(cfg.batch_size, 3, size, size, device=device)
    inputs = inputs.contiguous(memory_format=memory_format(cfg.channels_last))
    labels = torch.randint(0, data.num_classes, (cfg.batch_size,), device=device)
    return lambda: step(inputs, labels)


def dataloader_step_rates(cfg: DictConfig, data: CifarData, cpu_data: CifarData, windows: int,
                          window_steps: int, num_workers: int) -> list[float]:
    """(c) The same step fed by a DataLoader running per-image torchvision v2 transforms."""
    # The earlier measurements' CUDA graphs go before the workers fork: a forked child
    # that inherited one fails (with a warning) to release it.
    gc.collect()
    step, parts = _model_step(cfg, data)
    device = data.train_images.device
    dataset = ArrayDataset(cpu_data.train_images, cpu_data.train_labels,
                           per_image_transform(parts.augmentation))
    batches = endless_batches(dataset, cfg.batch_size, num_workers,
                              pin_memory=device.type == "cuda", seed=cfg.seed)
    layout = memory_format(cfg.channels_last)

    def one_step() -> torch.Tensor:
        images, labels = next(batches)
        images = images.to(device, non_blocking=True).contiguous(memory_format=layout)
        return step(images, labels.to(device, non_blocking=True))

    try:
        return _timed_windows(one_step, device, cfg.batch_size, windows, window_steps)
    finally:
        batches.close()  # lets the DataLoader's workers shut down


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


def framework_step_rates(cfg: DictConfig, data: CifarData, windows: int, window_steps: int,
                         store: str | None) -> FrameworkTiming:
    """(b) The real training loop, timed as it logs every `log_every` steps to the MLflow
    store `store` (None: tracking off), after a warm-up of `window_steps` steps."""
    recorder, result = _run_framework(cfg, data, (windows + 1) * window_steps, store)
    rates = [rate for step, rate in recorder.rates if step > window_steps]
    return FrameworkTiming(rates, result.train_seconds, recorder.logging_seconds)


def _run_framework(cfg: DictConfig, data: CifarData, steps: int, store: str | None,
                   stop: StopCheck | None = None) -> tuple[_RateRecorder, TrainResult]:
    """The real training loop for `steps` steps, logging to the MLflow store `store` (None:
    tracking off); `stop` is its per-step stop check."""
    parts = build_parts(cfg, data, shares_console=True)  # the bench prints its own lines
    parts.settings = replace(parts.settings, steps=steps, eval_every=steps)
    # The closing evaluation is not timed; one batch of test images keeps it short.
    data = data.first_test_images(cfg.eval_batch_size)
    with RunTracker(store, "bench", "bench") if store else nullcontext() as tracker:
        recorder = _RateRecorder(tracker)
        result = train(parts, data, recorder, stop=stop)
        if tracker is not None:
            start = time.perf_counter()
            tracker.flush()
            recorder.logging_seconds += time.perf_counter() - start
    return recorder, result


class _ProfiledSteps:
    """A stop check for the training loop that never asks it to stop: the loop calls it
    after each step, so it starts `profiler` after `warmup` steps and stops it `steps`
    steps later."""

    def __init__(self, profiler: WindowProfiler, warmup: int, steps: int) -> None:
        self.profiler, self.warmup, self.steps = profiler, warmup, steps
        self.done = 0

    def __call__(self) -> None:
        self.done += 1
        if self.done == self.warmup:
            self.profiler.start()
        elif self.done == self.warmup + self.steps:
            self.profiler.stop()


def profile_steps(cfg: DictConfig, data: CifarData, warmup: int, steps: int,
                  folder: Path) -> dict[str, StepProfile]:
    """Profile `steps` steps of (a) and of (b) after `warmup` (at least 1) steps of each;
    the Chrome traces go to `folder`."""
    if warmup < 1 or steps < 1:
        raise ValueError("profiling needs at least one warm-up step and one profiled step")
    device = data.train_images.device
    bare_step = _bare_step(cfg, data)
    for _ in range(warmup):
        bare_step()
    profiler = WindowProfiler(device)
    profiler.start()
    for _ in range(steps):
        bare_step()
    profiler.stop()
    bare = profiler.summary(steps, folder / "bare_step.json")

    profiler = WindowProfiler(device)
    with tempfile.TemporaryDirectory() as store_folder:
        # One step more, so that the closing evaluation falls outside the profile.
        _run_framework(cfg, data, warmup + steps + 1, f"sqlite:///{store_folder}/bench.db",
                       _ProfiledSteps(profiler, warmup, steps))
    framework = profiler.summary(steps, folder / "framework_step.json")
    return {"bare": bare, "framework": framework}


def default_workers() -> list[int]:
    """DataLoader worker counts to try: 0, then powers of two up to the cores there are."""
    cores = os.cpu_count() or 1
    return [0] + [n for n in (1, 2, 4, 8, 16) if n <= cores]


def _setup(overrides: Sequence[str]) -> tuple[DictConfig, CifarData, CifarData]:
    """The config, and the data set on the CPU and on the training device."""
    cfg = compose_config(overrides)
    validate(cfg)
    cpu_data = load_cifar(cfg.data.name, cfg.data.root, cfg.data.download)
    return cfg, cpu_data, cpu_data.to(resolve_device(cfg.device))


def _description(cfg: DictConfig, data: CifarData, overrides: Sequence[str]) -> dict:
    device = data.train_images.device
    settings = build_settings(cfg, device)
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "overrides": list(overrides),
        "model": cfg.model.name,
        "augmentation": cfg.augmentation.name,
        "batch_size": cfg.batch_size,
        "amp": settings.amp,
        "compile": settings.compile,
        "cuda_graph": settings.cuda_graph,
        "channels_last": settings.channels_last,
    }


def measure_bare(overrides: Sequence[str], windows: int = 5, window_steps: int = 20) -> dict:
    """(a) alone: the quick way to compare speed options."""
    cfg, _, data = _setup(overrides)
    rate = statistics.median(bare_step_rates(cfg, data, windows, window_steps))
    return {**_description(cfg, data, overrides), "bare_examples_per_sec": rate}


def measure(overrides: Sequence[str], windows: int = 5, window_steps: int = 20,
            workers: Sequence[int] = ()) -> dict:
    """Run the comparison and return its figures."""
    cfg, cpu_data, data = _setup(overrides)
    loader_rates = {}
    for num_workers in workers or default_workers():
        rates = dataloader_step_rates(cfg, data, cpu_data, windows, window_steps, num_workers)
        loader_rates[str(num_workers)] = statistics.median(rates)  # str keys, as JSON has
    best_workers = int(max(loader_rates, key=loader_rates.__getitem__))
    bare: list[float] = []
    tracked: list[FrameworkTiming] = []
    untracked: list[FrameworkTiming] = []
    with tempfile.TemporaryDirectory() as folder:
        store = f"sqlite:///{folder}/bench.db"
        for _ in range(2):  # interleaved, so that drift in the machine's speed hits all three
            bare += bare_step_rates(cfg, data, windows, window_steps)
            tracked.append(framework_step_rates(cfg, data, windows, window_steps, store))
            untracked.append(framework_step_rates(cfg, data, windows, window_steps, None))
    bare_rate = statistics.median(bare)
    framework_rate = statistics.median([rate for timing in tracked for rate in timing.rates])
    untracked_rate = statistics.median([rate for timing in untracked for rate in timing.rates])
    logging_share = (sum(t.logging_seconds for t in tracked)
                     / sum(t.train_seconds for t in tracked))
    return {
        **_description(cfg, data, overrides),
        "windows": windows,
        "window_steps": window_steps,
        "bare_examples_per_sec": bare_rate,
        "framework_examples_per_sec": framework_rate,
        "framework_over_bare": framework_rate / bare_rate,
        "untracked_examples_per_sec": untracked_rate,
        "tracking_overhead": 1 - framework_rate / untracked_rate,
        "logging_share": logging_share,
        "dataloader_examples_per_sec": loader_rates,
        "dataloader_best_workers": best_workers,
        "framework_over_dataloader": framework_rate / loader_rates[str(best_workers)],
    }


def markdown_row(figures: dict) -> str:
    """One row for a results table (header: MARKDOWN_HEADER)."""
    best = figures["dataloader_best_workers"]
    return (f"| {figures['device']} | {figures['torch']} | {figures['model']} | "
            f"{figures['batch_size']} | {_speed_options(figures)} | "
            f"{figures['bare_examples_per_sec']:,.0f} | "
            f"{figures['framework_examples_per_sec']:,.0f} | "
            f"{figures['dataloader_examples_per_sec'][str(best)]:,.0f} ({best} workers) | "
            f"{figures['framework_over_bare']:.3f} | {figures['framework_over_dataloader']:.2f} | "
            f"{100 * figures['logging_share']:.2f}% |")


def _speed_options(figures: dict) -> str:
    """The amp format, and the compile mode and CUDA graphs where used."""
    options = [figures["amp"]]
    if figures["compile"] != "none":
        options.append(f"compile {figures['compile']}")
    if figures["cuda_graph"]:
        options.append("CUDA graph")
    return ", ".join(options)


MARKDOWN_HEADER = ("| device | torch | model | batch | amp | (a) bare step | "
                   "(b) framework | (c) DataLoader | b/a | b/c | MLflow time |\n"
                   "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def measure_profiles(overrides: Sequence[str], warmup: int, steps: int,
                     folder: Path) -> dict:
    """Profile (a) and (b) and return the per-step figures."""
    cfg, _, data = _setup(overrides)
    profiles = profile_steps(cfg, data, warmup, steps, folder)
    return {**_description(cfg, data, overrides), "profiled_steps": steps,
            **{name: {"ms_per_step": profile.ms_per_step,
                      "operators_per_step": profile.operators_per_step,
                      "launches_per_step": profile.launches_per_step,
                      "trace": str(profile.trace)}
               for name, profile in profiles.items()},
            "tables": {name: profile.table for name, profile in profiles.items()}}


def _print_profiles(overrides: Sequence[str], steps: int, folder: Path,
                    json_path: Path | None) -> None:
    figures = measure_profiles(overrides, steps, steps, folder)
    tables = figures.pop("tables")
    _print_description(figures)
    print(f"profile of {steps} steps after {steps} warm-up steps; Chrome traces in {folder}")
    print(f"{'':22}{'ms/step':>10}{'operators/step':>16}{'GPU launches/step':>19}")
    for name, label in (("bare", "(a) bare model step"), ("framework", "(b) framework step")):
        row = figures[name]
        launches = row["launches_per_step"]
        print(f"{label:22}{row['ms_per_step']:10.2f}{row['operators_per_step']:16.1f}"
              f"{'-' if launches is None else f'{launches:.1f}':>19}")
    print("\nthe costliest operators of (b), all profiled steps together:")
    print(tables["framework"])
    if json_path:
        json_path.write_text(json.dumps(figures, indent=2) + "\n")


def _print_description(figures: dict) -> None:
    print(f"device {figures['device']}, torch {figures['torch']}, {figures['threads']} threads, "
          f"{figures['model']}, batch {figures['batch_size']}, {figures['amp']}, "
          f"compile {figures['compile']}, cuda_graph {figures['cuda_graph']}, "
          f"channels_last {figures['channels_last']}")


def argument_parser() -> argparse.ArgumentParser:
    """The command line of cifar-exp-bench (python -m cifar_exp.bench)."""
    parser = argparse.ArgumentParser(prog="python -m cifar_exp.bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as for cifar_exp.run")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per measurement")
    parser.add_argument("--window-steps", type=int, default=20, help="steps per window")
    parser.add_argument("--workers", type=lambda text: [int(n) for n in text.split(",")],
                        default=[], help="DataLoader worker counts for (c), e.g. 0,2,4 "
                        "(default: 0 and powers of two up to the core count)")
    parser.add_argument("--bare-only", action="store_true",
                        help="measure (a) alone, e.g. to compare speed options")
    parser.add_argument("--profile", type=Path, metavar="FOLDER",
                        help="instead of rates: profile one window of (a) and of (b) after a "
                        "warm-up window, print where the time goes and write Chrome traces "
                        "to this folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--sweep", type=int, metavar="N",
                        help="instead: time a sweep of N seeds run one after another and "
                        "packed onto the device (hydra/launcher=packed), as jobs per hour")
    parser.add_argument("--modes", default="sequential,stacked,processes",
                        help="with --sweep: the ways to run it (sequential, stacked, processes, "
                        "ray), the first is the baseline")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.windows < 1 or args.window_steps < 1:
        parser.error("--windows and --window-steps must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    if args.sweep is not None:
        try:
            print(sweep_bench.run(args.sweep, args.modes.split(","), args.overrides))
        except (ValueError, RuntimeError) as error:
            parser.exit(2, f"error: {error}\n")
        return
    if args.profile:
        _print_profiles(args.overrides, args.window_steps, args.profile, args.json)
        return
    if args.bare_only:
        figures = measure_bare(args.overrides, args.windows, args.window_steps)
    else:
        figures = measure(args.overrides, args.windows, args.window_steps, args.workers)
    _print_description(figures)
    print(f"(a) bare model step   {figures['bare_examples_per_sec']:10.1f} examples/sec")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if args.bare_only:
        return
    print(f"(b) framework step    {figures['framework_examples_per_sec']:10.1f} examples/sec"
          f"   b/a = {figures['framework_over_bare']:.3f}")
    print(f"    without tracking  {figures['untracked_examples_per_sec']:10.1f} examples/sec"
          f"   {100 * figures['tracking_overhead']:+.1f}% with tracking")
    print(f"time inside MLflow calls: {100 * figures['logging_share']:.2f}% of training time")
    for workers, rate in figures["dataloader_examples_per_sec"].items():
        print(f"(c) DataLoader, {workers} workers {rate:10.1f} examples/sec")
    print(f"b/c = {figures['framework_over_dataloader']:.2f} "
          f"(against the best, {figures['dataloader_best_workers']} workers)")
    print(MARKDOWN_HEADER)
    print(markdown_row(figures))

