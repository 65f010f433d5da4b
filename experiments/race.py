"""Race airbench94 and airbench94_muon, run from their published code, against this
project's `experiment=fast94` and `experiment=fast94_muon`: on one GPU, on the same data
copy, over the same number of runs each, in one call; nothing is fetched from the network.

    CIFAR_EXP_DATA=/path/to/data python experiments/race.py --peers peers --seeds 5

It prints one markdown table: per contender, the training time per run and the test
precision with test-time augmentation, each as mean ± std over the runs, on
CIFAR-10 (JPEG copy).

The peers' code (Keller Jordan's cifar10-airbench) is not part of this repository. Put,
into a folder of your own (`/peers/` at the repository root is ignored by git):

    peers/airbench94.py        legacy/airbench94.py of KellerJordan/cifar10-airbench
    peers/airbench94_muon.py   airbench94_muon.py of the same repository

The files are used as they are; this script runs a copy of each, in a temporary working
folder, with these textual changes only (it refuses a file where one does not match
exactly once):

- airbench94.py: `for run in range(25)` becomes `for run in range(SEEDS)`, and its
  commented-out `#main('warmup')` is enabled, so that it gets the same one warm-up run
  as airbench94_muon (the warm-up runs are left out of the table).
- airbench94_muon.py: `for run in range(200)` becomes `for run in range(SEEDS)`.

Their data: both scripts read `cifar10/train.pt` and `cifar10/test.pt` from their working
folder and only download CIFAR-10 with torchvision when those are missing. This script
writes our data copy there first, as their loader saves it: a dict of `images` (uint8,
N x 32 x 32 x 3, channels last), `labels` (int64, N) and `classes` (the class names), read
from `$CIFAR_EXP_DATA` (or `--data`) by cifar_exp.data.load_cifar. So no download happens
and their code is not changed to read it. The peers need torch and torchvision (the
project's environment has both); they pick their own seeds (none).

Timing. Every contender's time is its training time per run, the GPU synchronized at the
end, evaluation excluded, after one warm-up run that is left out:
- the peers print their own `time_seconds` / `total_time_seconds`, CUDA events around each
  epoch's steps plus the whitening initialization (milliseconds); the table takes the value
  at their last training epoch (before they add their final TTA evaluation);
- ours is the trainer's `train_seconds`: from the first step to the last, the losses read
  back (a device sync) at each log line, evaluation excluded. Our runs go in-process
  through cifar_exp's own build and train (no MLflow, no checkpoints), the warm-up run
  seeded 1000, the timed ones seeded 0, 1, ...

The precision is the peers' `tta_val_acc` and our final `precision` (with `tta` set by
the recipes: flip and translate, the peers' TTA level 2), on all 10,000 test images.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PEERS = {  # contender -> (file in --peers, [(text, replacement with {seeds})])
    "airbench94": ("airbench94.py", [("for run in range(25)", "for run in range({seeds})"),
                                     ("#main('warmup')", "main('warmup')")]),
    "airbench94_muon": ("airbench94_muon.py", [("for run in range(200)",
                                                "for run in range({seeds})")]),
}
OURS = {"fast94": "experiment=fast94", "fast94_muon": "experiment=fast94_muon"}
CONTENDERS = ("airbench94", "airbench94_muon", "fast94", "fast94_muon")
WARMUP_SEED = 1000
DATA_LABEL = "CIFAR-10 (JPEG copy)"


class RaceError(Exception):
    """A problem with the race's inputs, said in one line."""


@dataclass
class Result:
    contender: str
    code: str  # where the contender's code comes from
    seconds: list[float] = field(default_factory=list)  # training time per run
    precision: list[float] = field(default_factory=list)  # with TTA, per run


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python experiments/race.py",
        description="Race airbench94 and airbench94_muon (their published code, from "
                    "--peers) against experiment=fast94 and experiment=fast94_muon on one "
                    "GPU; print a markdown table. See the file's docstring.")
    parser.add_argument("--peers", type=Path, required=True,
                        help="folder holding airbench94.py and airbench94_muon.py")
    parser.add_argument("--seeds", type=int, default=5, help="timed runs per contender")
    parser.add_argument("--data", default=None,
                        help="folder holding cifar-10-batches-bin/ (default: $CIFAR_EXP_DATA)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated subset of " + ", ".join(CONTENDERS))
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the peers' logs and results.json (default: a "
                             "temporary folder)")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python that runs the peers (with torch and torchvision)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, checked: an unknown contender, a bad --seeds or a missing peer file
    ends the program with a one-line error."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    args.contenders = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = sorted(set(args.contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose among {', '.join(CONTENDERS)}")
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds} must be at least 1")
    try:
        args.peer_files = peer_files(args.peers, args.contenders)
    except RaceError as error:
        parser.error(str(error))
    return args


def peer_files(folder: Path, contenders: Sequence[str]) -> dict[str, Path]:
    """The peer scripts the chosen contenders need, which must exist in `folder`."""
    wanted = [name for name in contenders if name in PEERS]
    if wanted and not folder.is_dir():
        raise RaceError(f"--peers {folder}: no such folder; put airbench's "
                        f"{' and '.join(PEERS[n][0] for n in wanted)} there (see the docstring)")
    files = {name: folder / PEERS[name][0] for name in wanted}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise RaceError(f"missing peer script(s) {', '.join(missing)} (see the docstring)")
    return files


def patched(text: str, name: str, seeds: int) -> str:
    """The peer script `text` with its documented changes for `seeds` runs."""
    for old, new in PEERS[name][1]:
        count = text.count(old)
        if count != 1:
            raise RaceError(f"{PEERS[name][0]}: expected {old!r} once, found it {count} times; "
                            f"is it the published file?")
        text = text.replace(old, new.format(seeds=seeds))
    return text


def parse_peer_log(output: str) -> tuple[list[float], list[float]]:
    """(training seconds, TTA precision) of each non-warm-up run in a peer's printed table:
    rows `| run | epoch | ... | tta_val_acc | ...time_seconds |`, the run named on its first
    row only, the last row of a run with epoch `eval`."""
    header: list[str] | None = None
    seconds: list[float] = []
    precision: list[float] = []
    run, last_train_time = None, math.nan
    for line in output.splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            if "epoch" in cells and "tta_val_acc" in cells:
                header = cells
            continue
        row = dict(zip(header, cells, strict=False))
        time_key = next(key for key in header if key.endswith("time_seconds"))
        if row.get("run"):
            run = row["run"]
        if row.get("epoch") == "eval":
            if run != "warmup":
                seconds.append(last_train_time)
                precision.append(float(row["tta_val_acc"]))
            run, last_train_time = None, math.nan
        elif row.get(time_key):
            last_train_time = float(row[time_key])
    if header is None:
        raise RaceError("no airbench results table in the peer's output")
    return seconds, precision


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_table(results: Sequence[Result], device: str) -> str:
    """The race as a markdown table, one row per contender."""
    lines = [f"Race on {device}; precision on {DATA_LABEL}, with test-time augmentation; "
             f"training time per run (warm-up run excluded, see experiments/race.py).", "",
             f"| contender | code | runs | training time per run (s) | "
             f"precision with TTA, {DATA_LABEL} |",
             "| --- | --- | --- | --- | --- |"]
    for result in results:
        if not result.seconds:
            lines.append(f"| {result.contender} | {result.code} | 0 | failed | failed |")
            continue
        time_mean, time_std = mean_std(result.seconds)
        precision_mean, precision_std = mean_std(result.precision)
        lines.append(f"| {result.contender} | {result.code} | {len(result.seconds)} | "
                     f"{time_mean:.2f} ± {time_std:.2f} | "
                     f"{precision_mean:.4f} ± {precision_std:.4f} |")
    return "\n".join(lines)


def write_peer_data(folder: Path, data_root: str | None) -> None:
    """Our data copy as airbench's loader saves it: cifar10/train.pt and test.pt."""
    import torch

    from cifar_exp.data import load_cifar

    data = load_cifar("cifar10", data_root)
    target = folder / "cifar10"
    target.mkdir(parents=True, exist_ok=True)
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        torch.save({"images": images.permute(0, 2, 3, 1).contiguous(),
                    "labels": labels.to(torch.int64), "classes": list(data.classes)},
                   target / f"{split}.pt")


def run_peer(name: str, script: Path, seeds: int, workdir: Path, python: str,
             out: Path) -> Result:
    """Run a copy of the peer script with its documented changes in `workdir`."""
    copy = workdir / script.name
    copy.write_text(patched(script.read_text(), name, seeds))
    print(f"running {name} ({seeds} runs and a warm-up) ...", flush=True)
    process = subprocess.run([python, copy.name], cwd=workdir, capture_output=True,
                             text=True)
    (out / f"{name}.log").write_text(process.stdout + process.stderr)
    if process.returncode != 0:
        tail = (process.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{name} failed (exit {process.returncode}): {tail}", flush=True)
        return Result(name, f"{script.name}, published")
    seconds, precision = parse_peer_log(process.stdout)
    return Result(name, f"{script.name}, published", seconds, precision)


def run_ours(name: str, seeds: int, data_root: str | None, device: str) -> Result:
    """Train `experiment=<name>` in-process: one warm-up run, then seeds 0..seeds-1."""
    from cifar_exp.config import compose_config, validate
    from cifar_exp.data import load_cifar
    from cifar_exp.training.build import build_parts
    from cifar_exp.training.loop import train

    class NoSink:
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            pass

    overrides = [OURS[name], f"device={device}", "tracking.log_model=false",
                 "checkpoint.enabled=false"]
    if data_root is not None:
        overrides.append(f"data.root={data_root}")
    result = Result(name, f"cifar_exp {OURS[name]}")
    data = None
    for seed in (WARMUP_SEED, *range(seeds)):
        cfg = compose_config([*overrides, f"seed={seed}"])
        validate(cfg)
        if data is None:
            data = load_cifar(cfg.data.name, cfg.data.root).to(device)
        parts = build_parts(cfg, data, shares_console=True)  # the race prints its own lines
        trained = train(parts, data, NoSink())
        print(f"{name} seed {seed}: {trained.train_seconds:.2f} s, precision "
              f"{trained.precision:.4f}", flush=True)
        if seed != WARMUP_SEED:
            result.seconds.append(trained.train_seconds)
            result.precision.append(trained.precision)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("race.py: needs a CUDA GPU (the peers' code runs on CUDA only)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory(prefix="race_") as temporary:
        workdir = Path(temporary)
        out = args.out or workdir / "out"
        out.mkdir(parents=True, exist_ok=True)
        results = []
        if any(name in PEERS for name in args.contenders):
            write_peer_data(workdir, args.data)
        for name in args.contenders:
            if name in PEERS:
                results.append(run_peer(name, args.peer_files[name], args.seeds, workdir,
                                        args.python, out))
            else:
                results.append(run_ours(name, args.seeds, args.data, "cuda"))
        (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
        print()
        print(format_table(results, device))
    return 0 if all(result.seconds for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
