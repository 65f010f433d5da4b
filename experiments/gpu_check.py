"""The one call to make whenever a GPU is at hand: the checks and measurements that need one,
in priority order, each under its own time budget, in under 8 minutes on one H100/H200.

    bash experiments/gpu_check.sh [OUT]            # on the GPU machine ($OUT if set)
    bash experiments/gpu_check.sh --dry-run        # anywhere, on the CPU: checks only

The parts, most important first (budgets in seconds, PARTS below):
  1. the `gpu`-marked tests (python -m pytest -m gpu): the captured data path's first check
     on hardware;
  2. the framework step against the bare step (python -m cifar_exp.bench) for tf_cnn at
     batch 128 and 1024, and kernel launches per step at batch 128 with and without
     cuda_graph;
  3. the race (experiments/race.py): fast94 and fast94_muon against the airbench scripts
     they follow, interleaved, as many rounds as the budget allows;
  4. an 8-job packed sweep of fast94 against the same jobs one after another
     (experiments/packed_gpu.sh);
  5. the tutorial's 100,000-step run, end to end, if the time left allows it.

Each part writes one markdown table into the output folder (<n>_<part>.md), as soon as it
ends or runs out of time, so what finished is never lost; `summary.md` lists every part
with its state and seconds, and `gpu_check.log` holds all output (the raw files go to a
work folder outside it, so the output stays a handful of small files). What was skipped is
printed, and said in the summary.

`--dry-run` runs nothing on a GPU: it composes every cifar_exp command the check would run
(Hydra compose and validation), resolves the race's contenders (peer files at the named
revisions, every patch applying once), checks that the files are present and the data
carry round trip (experiments/carry_data.py), prints the plan with its budgets, and exits
non-zero if anything would fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
TOTAL_SECONDS = 470  # under 8 minutes, start-up of the parts included
RACE_CONTENDERS = "fast94,airbench94,airbench94_compiled,fast94_muon,airbench94_muon"
BATCHES = (128, 1024)
RACE_BUDGET = 270  # its own --budget is 30 s less: the last round and the table fit


@dataclass
class Part:
    name: str  # the table's file stem
    title: str
    budget: float  # seconds
    commands: list[list[str]]
    table: Callable[[Path], str]  # markdown from the work folder
    minimum: float = 0.0  # skipped unless this much of the total is left
    env: dict[str, str] = field(default_factory=dict)


def load_module(name: str):  # noqa: ANN201
    """An experiments/ script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --- the parts ---

def parts(args: argparse.Namespace, work: Path) -> list[Part]:
    py = args.python
    bench = [py, "-m", "cifar_exp.bench", "model=tf_cnn"]
    return [
        Part("1_gpu_tests", "the gpu-marked tests", 60,
             [[py, "-m", "pytest", "-m", "gpu", "-q", "-n", "0", "-p", "no:cacheprovider",
               f"--junitxml={work / 'gpu_tests.xml'}", "tests"]], tests_table),
        Part("2_bench", "framework against bare step, launches per step", 80,
             [*([*bench, f"batch_size={batch}", "--windows", "3", "--window-steps", "100",
                 "--workers", "8", "--json", str(work / f"bench_{batch}.json")]
                for batch in BATCHES),
              *([*bench, "batch_size=128", setting, "--window-steps", "20", "--profile",
                 str(work / f"profile_{name}"), "--json", str(work / f"profile_{name}.json")]
                for name, setting in PROFILES)], bench_table),
        Part("3_race", "fast94 and fast94_muon against their airbench peers", RACE_BUDGET,
             [[py, str(EXPERIMENTS / "race.py"), "--peers", str(args.peers), "--contenders",
               RACE_CONTENDERS, "--budget", str(RACE_BUDGET - 30), "--ready-timeout", "150",
               "--parallel-warmup", "--out", str(work / "race"),
               "--table", str(work / "race_table.md"),
               *(["--data", args.data] if args.data else [])]],
             lambda w: (w / "race_table.md").read_text()),
        Part("4_packed", "an 8-job packed sweep against one after another", 60,
             [["bash", str(EXPERIMENTS / "packed_gpu.sh")]],
             lambda w: (w / "packed" / "fast94.md").read_text(),
             env={"OUT": str(work / "packed"), "JOBS": "8", "SWEEPS": "fast94",
                  "MPS": "false", "PYTHON": py}),
        Part("5_sgd_100k", "the tutorial's 100,000-step run", 170,
             [[py, "-m", "cifar_exp.run", *SGD_OVERRIDES,
               f"tracking.uri=sqlite:///{work / 'sgd.db'}", f"hydra.run.dir={work / 'sgd'}"]],
             sgd_table, minimum=160),
    ]


PROFILES = (("graph", "cuda_graph=auto"), ("eager", "cuda_graph=false"))
SGD_OVERRIDES = ("optimizer=sgd_decay", "steps=100000", "eval_every=10000", "log_every=100")


def tests_table(work: Path) -> str:
    """The gpu tests' outcomes, from pytest's JUnit XML."""
    root = ElementTree.parse(work / "gpu_tests.xml").getroot()
    rows = ["| test | outcome | seconds |", "| --- | --- | --- |"]
    for case in root.iter("testcase"):
        outcome = next((child.tag for child in case
                        if child.tag in ("failure", "error", "skipped")), "passed")
        rows.append(f"| {case.get('classname')}::{case.get('name')} | {outcome} | "
                    f"{float(case.get('time', 0)):.1f} |")
    return "\n".join(rows)


def bench_table(work: Path) -> str:
    """The bench rows that finished, and launches per step from the profiles."""
    from cifar_exp.tools.bench import MARKDOWN_HEADER, markdown_row

    rows = [MARKDOWN_HEADER]
    rows += [markdown_row(json.loads(path.read_text()))
             for batch in BATCHES if (path := work / f"bench_{batch}.json").is_file()]
    rows += ["", "| batch 128 | step | ms/step | operators/step | GPU launches/step |",
             "| --- | --- | --- | --- | --- |"]
    for name, setting in PROFILES:
        path = work / f"profile_{name}.json"
        if not path.is_file():
            continue
        figures = json.loads(path.read_text())
        for step in ("bare", "framework"):
            row = figures[step]
            rows.append(f"| {setting} | {step} | {row['ms_per_step']:.2f} | "
                        f"{row['operators_per_step']:.1f} | {row['launches_per_step']} |")
    return "\n".join(rows)


def sgd_table(work: Path) -> str:
    import re

    log = (work / "5_sgd_100k.log").read_text()
    final = re.findall(r"final precision @ 1 = ([0-9.]+) \(([0-9]+) examples/sec", log)
    timeline = re.findall(r"\] time: (.*)", log)
    precision, rate = final[-1] if final else ("?", "?")
    return ("| run | precision, CIFAR-10 (JPEG copy) | examples/sec | its time |\n"
            "| --- | --- | --- | --- |\n"
            f"| {' '.join(SGD_OVERRIDES)} | {precision} | {rate} | "
            f"{timeline[-1] if timeline else '?'} |")


# --- running them ---

def run_part(part: Part, budget: float, work: Path, out: Path, log) -> str:  # noqa: ANN001
    """Run the part's commands under `timeout`, within `budget` seconds in all; write its
    table (with what finished) and return its state."""
    start, state = time.monotonic(), "done"
    with (work / f"{part.name}.log").open("w") as part_log:
        for command in part.commands:
            left = budget - (time.monotonic() - start)
            if left < 5:
                state = "out of time"
                break
            line = f"$ {shlex.join(command)}  (timeout {left:.0f} s)"
            print(line, flush=True)
            log.write(line + "\n")
            process = subprocess.Popen(
                ["timeout", "--kill-after=10", f"{left:.0f}", *command], cwd=REPO,
                env={**os.environ, **part.env}, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
            assert process.stdout is not None
            for text in process.stdout:
                sys.stdout.write(text)
                log.write(text)
                part_log.write(text)
            code = process.wait()
            if code in (124, 137):
                state = "out of time"
                break
            if code != 0:
                state = f"failed (exit {code})"
    seconds = time.monotonic() - start
    try:
        table = part.table(work)
    except Exception as error:  # noqa: BLE001  # a part that wrote nothing still gets a file
        table = f"(no table: {type(error).__name__}: {error})"
    (out / f"{part.name}.md").write_text(
        f"# {part.title}\n\n{state}, {seconds:.0f} s of a {budget:.0f} s budget\n\n"
        f"{table}\n")
    return f"{state}, {seconds:.0f} s"


def run_all(args: argparse.Namespace, out: Path, work: Path) -> int:
    start = time.monotonic()
    summary = ["| part | budget (s) | state |", "| --- | --- | --- |"]
    skipped = []
    with (out / "gpu_check.log").open("a") as log:
        for part in parts(args, work):
            left = args.total - (time.monotonic() - start)
            if left < max(part.minimum, 10):
                skipped.append(part.name)
                state = f"skipped: {left:.0f} s left, it needs {max(part.minimum, 10):.0f}"
            else:
                state = run_part(part, min(part.budget, left), work, out, log)
            summary.append(f"| {part.name}: {part.title} | {part.budget:.0f} | {state} |")
            (out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n" + "\n".join(summary))
    print(f"skipped: {', '.join(skipped)}" if skipped else "skipped: nothing")
    return 0


# --- the dry run ---

def check_commands(args: argparse.Namespace, work: Path) -> list[str]:
    """Problems with the cifar_exp commands: each composed and validated as it would run."""
    from cifar_exp.config import command_overrides, compose_config, validate

    problems = []
    for part in parts(args, work):
        for command in part.commands:
            if command[1:3] not in (["-m", "cifar_exp.bench"], ["-m", "cifar_exp.run"]):
                continue
            # The overrides come first, the bench's flags after (parts() writes them so).
            overrides = list(itertools.takewhile(lambda a: not a.startswith("--"), command[3:]))
            try:
                validate(compose_config(command_overrides(list(overrides))))
            except Exception as error:  # any refusal (UserError, Hydra's) is a problem
                problems.append(f"{part.name}: {shlex.join(command[1:])}: {error}")
    # packed_gpu.sh's sweep: `cifar_exp.bench --sweep` with these overrides
    try:
        validate(compose_config(["experiment=fast94", "tracking.log_model=false"]))
    except Exception as error:  # noqa: BLE001
        problems.append(f"4_packed: experiment=fast94: {error}")
    return problems


def cifar10():  # noqa: ANN201
    from cifar_exp.data import SPECS

    return SPECS["cifar10"]


def binary_folder(args: argparse.Namespace) -> Path:
    """The CIFAR-10 binary folder the check reads: under --data, else $CIFAR_EXP_DATA."""
    return Path(args.data or os.environ.get("CIFAR_EXP_DATA", "")) / cifar10().binary_folder


def check_files(args: argparse.Namespace) -> list[str]:
    problems = []
    for script in ("race.py", "packed_gpu.sh", "carry_data.py"):
        if not (EXPERIMENTS / script).is_file():
            problems.append(f"missing experiments/{script}")
    shell = subprocess.run(["bash", "-n", str(EXPERIMENTS / "packed_gpu.sh")],
                           capture_output=True, text=True)
    if shell.returncode != 0:
        problems.append(f"packed_gpu.sh: {shell.stderr.strip()}")
    gpu_tests = [path for path in (REPO / "tests").rglob("test_*.py")
                 if "mark.gpu" in path.read_text()]
    if not gpu_tests:
        problems.append("no gpu-marked tests under tests/")
    root = binary_folder(args)
    missing = [path.name for path in cifar10().files(root) if not path.is_file()]
    if missing and not args.packed.is_dir():
        problems.append(f"data: {root} lacks {', '.join(missing)} and there is no packed "
                        f"copy in {args.packed}")
    return problems


def check_carry(args: argparse.Namespace, work: Path) -> tuple[list[str], str]:
    """The data carry round trip: the packed copy unpacked and checked where there is one,
    else a slice of the test batch packed and unpacked byte for byte."""
    carry = load_module("carry_data")
    try:
        if args.packed.is_dir():
            names = carry.unpack(args.packed, work / "unpacked")  # checks every SHA-256
            return [], f"{args.packed} unpacks into {len(names)} files, each checked"
        root = binary_folder(args)
        source = work / "slice"
        source.mkdir()
        (source / "test_batch.bin").write_bytes((root / "test_batch.bin").read_bytes()
                                                [: 250 * carry.RECORD])
        carry.pack(source, work / "packed_slice")
        carry.unpack(work / "packed_slice", work / "rebuilt")
        same = ((work / "rebuilt" / "test_batch.bin").read_bytes()
                == (source / "test_batch.bin").read_bytes())
        return ([] if same else ["carry: a slice did not unpack byte for byte"],
                f"no packed copy in {args.packed}: a 250-image slice packed and unpacked "
                "byte for byte")
    except (carry.CarryError, OSError) as error:
        return [f"carry: {error}"], "carry round trip failed"


def check_race(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    race = load_module("race")
    race_args = race.parse_args(["--peers", str(args.peers), "--contenders",
                                 RACE_CONTENDERS if not args.no_peers else "fast94,fast94_muon",
                                 "--budget", str(RACE_BUDGET - 30),
                                 *(["--data", args.data] if args.data else [])])
    return ([f"race: {p}" for p in race.check_plan(race_args)], race.plan_lines(race_args))


def dry_run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="gpu_check_dry_") as temporary:
        work = Path(temporary)
        problems = check_files(args) + check_commands(args, work)
        race_problems, race_plan = check_race(args)
        carry_problems, carry_note = check_carry(args, work)
        problems += race_problems + carry_problems
        print(f"plan: {args.total} s in all, output into {args.out or '$OUT'}")
        elapsed = 0.0
        for part in parts(args, work):
            note = f" (only if {part.minimum:.0f} s are left)" if part.minimum else ""
            print(f"{part.name}: {part.title}, budget {part.budget:.0f} s, "
                  f"from {elapsed:.0f} s{note}")
            elapsed += part.budget
            for command in part.commands:
                env = " ".join(f"{k}={v}" for k, v in part.env.items())
                print(f"    {env + ' ' if env else ''}{shlex.join(command)}")
        print("race:\n    " + "\n    ".join(race_plan))
        print(f"data carry: {carry_note}")
        wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
        print(f"wheels: {len(wheels)} in {args.wheels}"
              + ("" if wheels else " (the GPU image must then hold hydra-core, omegaconf and "
                 "mlflow itself: see experiments/README.md)"))
    for problem in problems:
        print(f"would fail: {problem}", file=sys.stderr)
    print("dry run: " + (f"{len(problems)} problem(s)" if problems else "ok"))
    return 1 if problems else 0


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bash experiments/gpu_check.sh",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=None,
                        help="output folder (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything on the CPU, print the plan, run nothing")
    parser.add_argument("--peers", type=Path, default=REPO / "peers")
    parser.add_argument("--no-peers", action="store_true",
                        help="dry run only: check the race without the peers' files")
    parser.add_argument("--packed", type=Path, default=REPO / ".carry" / "data",
                        help="the packed data set (experiments/carry_data.py)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl")
    parser.add_argument("--data", default=None, help="data root (default: $CIFAR_EXP_DATA)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for raw files (default: a temporary folder)")
    parser.add_argument("--total", type=float, default=TOTAL_SECONDS)
    parser.add_argument("--python", default=sys.executable)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    args.out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if args.dry_run:
        return dry_run(args)
    if args.out is None:
        print("gpu_check: give an output folder (or set OUT)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return run_all(args, args.out, args.work)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as temporary:
        return run_all(args, args.out, Path(temporary))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # cifar_exp from this checkout
    sys.exit(main())
