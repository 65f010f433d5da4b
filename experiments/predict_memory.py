"""Peak memory and time of `python -m cifar_exp.predict` over many image files: N random
32 x 32 PNG files written to a temporary folder, then classified by a trained model (a
checkpoint or a run: this trains nothing) in a child process. Prints one markdown table
row, after the header.

    CIFAR_EXP_DATA=<data> python experiments/predict_memory.py --checkpoint <checkpoint>
    CIFAR_EXP_DATA=<data> python experiments/predict_memory.py --run <run_id> --files 2000

The peak is the child's peak resident set (getrusage RUSAGE_CHILDREN: it is the only
child); the time is the child's, from its start (imports, the model's loading) to its
exit. Streaming keeps the peak flat in the number of files."""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cifar_exp.errors import CommandParser, UserError, refuse
from cifar_exp.serving.source import add_source_arguments

HEADER = "| files | peak RSS (MiB) | seconds | lines printed |\n| ---: | ---: | ---: | ---: |"


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` random 32 x 32 RGB PNG files in `folder`, named in order (000000.png, ...)."""
    generator = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{index:06d}.png"
        Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def source_arguments(args: argparse.Namespace) -> list[str]:
    """The model's options, as predict takes them."""
    if args.run:
        return ["--run", args.run, "--tracking-uri", args.tracking_uri]
    return ["--checkpoint", str(args.checkpoint)]


def measure(folder: Path, options: list[str]) -> tuple[int, float, float]:
    """Run predict over `folder`: (lines it printed, its peak RSS in MiB, its seconds). Its
    output is counted as it comes, not kept."""
    command = [sys.executable, "-m", "cifar_exp.predict", str(folder), *options]
    with tempfile.TemporaryFile("w+") as errors:
        start = time.perf_counter()
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True) as child:
            lines = sum(1 for _ in child.stdout)
        seconds = time.perf_counter() - start
        if child.returncode:
            errors.seek(0)
            raise UserError(f"predict exited with {child.returncode}: "
                            f"{errors.read().strip()[-2000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return lines, peak_kib / 1024, seconds


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="predict_memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000,
                        help="image files to write and classify (default 100000)")
    add_source_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (predict's)")
    try:
        args = parser.parse_args(argv)
        if args.files < 1:
            parser.error("--files must be at least 1")
        with tempfile.TemporaryDirectory(prefix="predict_memory_") as folder:
            write_images(Path(folder), args.files)
            lines, peak, seconds = measure(
                Path(folder), [*source_arguments(args), "--device", args.device])
    except UserError as error:
        refuse(error)
    print(HEADER)
    print(f"| {args.files:,} | {peak:,.0f} | {seconds:.1f} | {lines:,} |")


if __name__ == "__main__":
    main()
