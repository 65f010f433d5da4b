"""Race this project's fast recipes against the published airbench scripts they follow, on one
GPU, fairly: the same span timed on both sides, every contender in a fresh process of its
own, runs interleaved round by round, differences given with 95% confidence intervals.

    CIFAR_EXP_DATA=/path/to/data python experiments/race.py --peers peers
    python experiments/race.py --peers peers --dry-run      # on any machine: checks only
    python experiments/race.py --peers peers --export-from /path/to/cifar10-airbench/.git

Contenders. Each recipe races the revision of airbench it follows and the fastest published
variant of that script (KellerJordan/cifar10-airbench; the recipes name theirs in a comment):

    fast94       airbench94.py @ 01a2367 (3.83 s published), legacy/airbench94_compiled.py
                 @ 1b8f794 (3.09 s, torch.compile max-autotune)
    fast94_muon  airbench94_muon.py @ 096d14d (2.59 s)
    fast96       airbench96.py @ 033d2e7 (its 06/13/24 update: 96.01%, widths 128/512/512,
                 31 epochs), airbench96_faster.py @ 9e36930 (27.3 s)

The peers' code is not part of this repository. `--export-from` writes each file from a
local clone of theirs into `--peers` (`/peers/` is ignored by git) as `<name>@<rev>.py`;
a file whose git blob id is not the named revision's is refused.

Changes to the peers' scripts: one textual replacement each, which must match exactly once
(checked by `--dry-run`): their `for run in range(N)` becomes `for run in iter(input,
"stop")`, so that the race asks for each run on the process's stdin. Nothing else changes:
they warm up as published (a `warmup` run where the script has one; where it has none the
race asks for one run named `warmup` first), and read our data copy, written where their
loader looks for it (`cifar10/train.pt`, `test.pt`), so nothing is downloaded.

The span timed, the same on both sides: from the first use of the training data (the
whitening layer's initialization from training images) to the last optimizer step (with
lookahead's last copy), the GPU synchronized; evaluations excluded, the final TTA
evaluation too (the published figures include it). The peers time it themselves (CUDA
events, summed over their whitening init and epochs: their time column at the last epoch's
row). Ours is timed around cifar_exp's build and train calls: building the parts (the
augmentation's statistics, the model, its whitening init, the optimizer; synchronized)
plus train()'s wall time less its evaluation time. So ours also counts the parts' host-side
construction, the CUDA-graph captures that every run pays (also shown on their own), and a
host sync at every log line (`log_every`): the framework's costs, counted against it.

Order and statistics. Every contender runs in its own process, started fresh, warmed up
once (that run left out). The race then goes round by round: each round asks every
contender with runs left for one run, in an order rotated by one each round, so a drift of
the machine's speed lands on all; round r is our seed r. `--runs` (default 25) and
`--runs-of NAME=N` (default 5 for the 96% recipes) set the runs; `--budget` stops before a
round that would not fit. The tables (rewritten after every round, so a stopped race keeps
what finished) give each contender's time and precision with TTA, mean ± std, the numeric
format it trains in, and each recipe's difference from each of its peers with a 95%
confidence interval (cifar_exp.tracking.comparison: paired by round where both ran the same
rounds, else Welch).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER_REPOSITORY = "KellerJordan/cifar10-airbench"
RUNS_FROM_STDIN = 'iter(input, "stop")'
RESULT_PREFIX = "RACE_RESULT "  # our workers' result lines
WARMUP_SEED = 1000
DATA_LABEL = "CIFAR-10 (JPEG copy)"
FP16 = "fp16 weights and activations (BatchNorm fp32)"


@dataclass(frozen=True)
class Peer:
    """One published script at one revision of the peers' repository."""

    path: str  # in their repository
    revision: str
    blob: str  # git blob id of `path` at `revision`: the file must be exactly this
    published: str
    trains_in: str
    own_warmup: bool  # runs a warm-up itself before its timed runs
    runs_line: str  # the one text replaced by `for run in RUNS_FROM_STDIN`

    @property
    def file(self) -> str:
        """Its name in --peers."""
        return f"{Path(self.path).stem}@{self.revision}.py"


PEERS = {
    "airbench94": Peer("airbench94.py", "01a2367", "b9af1b84211ae647becaaf118833d3cbcbc760b2",
                       "94.01%, 3.83 s (A100)", FP16, False, "for run in range(25)"),
    "airbench94_compiled": Peer(
        "legacy/airbench94_compiled.py", "1b8f794", "2cbf7fe163c2ef1f2a64a353c969da49b48021b2",
        "94.01%, 3.09 s (A100)", FP16 + ", torch.compile max-autotune", True,
        "for run in range(25)"),
    "airbench94_muon": Peer(
        "airbench94_muon.py", "096d14d", "e056a094d4675a57b64b92c01880d760a0155b6d",
        "94.01%, 2.59 s (A100)", FP16 + ", Muon's Newton-Schulz in bf16, torch.compile "
        "max-autotune", True, "for run in range(200)"),
    "airbench96": Peer("airbench96.py", "033d2e7", "8c336444e5968acbdc1d0203acb2f2957d1526d6",
                       "96.01% (n=400); no time for this revision", FP16, False,
                       "for run in range(25)"),
    "airbench96_faster": Peer(
        "airbench96_faster.py", "9e36930", "a4f622aad4a2a108dd3a260477de98649fa72a35",
        "96.00%, 27.3 s (A100)", FP16 + ", torch.compile max-autotune", False,
        "for run in range(200)"),
}


@dataclass(frozen=True)
class Ours:
    override: str
    peers: tuple[str, ...]  # the revision it follows first, then the fastest variant


OURS = {
    "fast94": Ours("experiment=fast94", ("airbench94", "airbench94_compiled")),
    "fast94_muon": Ours("experiment=fast94_muon", ("airbench94_muon",)),
    "fast96": Ours("experiment=fast96", ("airbench96", "airbench96_faster")),
}
CONTENDERS = ("fast94", "airbench94", "airbench94_compiled", "fast94_muon", "airbench94_muon",
              "fast96", "airbench96", "airbench96_faster")
SLOW = ("fast96", "airbench96", "airbench96_faster")  # tens of seconds a run
SLOW_RUNS = 5


class RaceError(Exception):
    """A problem with the race's inputs, said in one line."""


# --- the peers' files: exported, checked, patched ---

def git_blob_id(data: bytes) -> str:
    """The id git gives a file of these bytes (so a file is tied to a revision)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def patched(text: str, name: str) -> str:
    """The peer script `text` with its one documented change; RaceError where the text to
    replace does not occur exactly once."""
    old = PEERS[name].runs_line
    count = text.count(old)
    if count != 1:
        raise RaceError(f"{PEERS[name].file}: expected {old!r} once, found it {count} times; "
                        f"is it {PEERS[name].path} at {PEERS[name].revision}?")
    return text.replace(old, f"for run in {RUNS_FROM_STDIN}")


def check_peer(name: str, folder: Path) -> str:
    """The patched script of peer `name` from `folder`, checked: present, exactly the named
    revision's file, and its patch applying once."""
    peer = PEERS[name]
    path = folder / peer.file
    if not path.is_file():
        raise RaceError(f"missing {path}: {peer.path} at {peer.revision} of {PEER_REPOSITORY} "
                        f"(write it with --export-from, see the docstring)")
    data = path.read_bytes()
    if git_blob_id(data) != peer.blob:
        raise RaceError(f"{path} is not {peer.path} at {peer.revision} (git blob "
                        f"{git_blob_id(data)[:12]}, expected {peer.blob[:12]})")
    return patched(data.decode(), name)


def export_peers(git_dir: Path, folder: Path, names: Sequence[str]) -> list[Path]:
    """Write each peer's file at its revision from a clone of theirs into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        peer = PEERS[name]
        shown = subprocess.run(["git", "--git-dir", str(git_dir), "show",
                                f"{peer.revision}:{peer.path}"], capture_output=True)
        if shown.returncode != 0:
            raise RaceError(f"git show {peer.revision}:{peer.path} in {git_dir} failed: "
                            f"{shown.stderr.decode().strip()}")
        (folder / peer.file).write_bytes(shown.stdout)
        written.append(folder / peer.file)
    return written


# --- reading a run's result from a contender's output ---

@dataclass
class RunRecord:
    run: str  # as the contender named it: `warmup` or the round's number
    seconds: float  # the span
    precision: float  # with TTA
    extra: dict[str, float | str] = field(default_factory=dict)


class PeerTable:
    """Reads airbench's printed table line by line: `feed` returns a run's record at its
    `eval` row (the run named on its first row; the time at the last training row)."""

    def __init__(self) -> None:
        self.header: list[str] | None = None
        self.run: str | None = None
        self.last_time = math.nan

    def feed(self, line: str) -> RunRecord | None:
        if not line.startswith("|"):
            return None
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if self.header is None:
            if "epoch" in cells and "tta_val_acc" in cells:
                self.header = cells
            return None
        row = dict(zip(self.header, cells, strict=False))
        time_key = next(key for key in self.header if key.endswith("time_seconds"))
        if row.get("run"):
            self.run = row["run"]
        if row.get("epoch") == "eval":
            record = RunRecord(self.run or "?", self.last_time, float(row["tta_val_acc"]))
            self.run, self.last_time = None, math.nan
            return record
        if row.get(time_key):
            self.last_time = float(row[time_key])
        return None


class OurLines:
    """Reads our worker's result lines (RESULT_PREFIX and a JSON object)."""

    def feed(self, line: str) -> RunRecord | None:
        if not line.startswith(RESULT_PREFIX):
            return None
        fields_ = json.loads(line[len(RESULT_PREFIX):])
        run, seconds, precision = fields_.pop("run"), fields_.pop("seconds"), fields_.pop(
            "precision")
        return RunRecord(str(run), seconds, precision, fields_)


def parse_peer_log(output: str) -> tuple[list[float], list[float]]:
    """(seconds, TTA precision) of each non-warm-up run in a peer's whole printed output."""
    table = PeerTable()
    records = [record for line in output.splitlines() if (record := table.feed(line))]
    if table.header is None:
        raise RaceError("no airbench results table in the peer's output")
    timed = [record for record in records if record.run != "warmup"]
    return [r.seconds for r in timed], [r.precision for r in timed]


# --- the contenders' processes ---

@dataclass
class Contender:
    name: str
    command: list[str]
    cwd: Path
    reader: Callable[[], PeerTable | OurLines]
    warmup_request: bool  # ask for a `warmup` run first (else it warms itself up)
    runs: int
    code: str = ""  # where its code comes from, for the table
    trains_in: str = ""
    published: str = ""


@dataclass
class Result:
    contender: str
    code: str
    trains_in: str = ""
    published: str = ""
    rounds: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    precision: list[float] = field(default_factory=list)
    extras: list[dict] = field(default_factory=list)
    failed: str = ""  # why it stopped early, if it did


class Worker:
    """A contender's process: requests go to its stdin, its output lines to a log file and
    a queue that a reader thread fills (so a wait can time out)."""

    def __init__(self, contender: Contender, log: Path) -> None:
        self.contender = contender
        self.parser = contender.reader()
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.tail: list[str] = []
        self.process = subprocess.Popen(
            contender.command, cwd=contender.cwd, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._read, args=(log,), daemon=True).start()

    def _read(self, log: Path) -> None:
        assert self.process.stdout is not None
        with log.open("w") as out:
            for line in self.process.stdout:
                out.write(line)
                out.flush()
                self.lines.put(line)
        self.lines.put(None)

    def send(self, run: str) -> None:
        """Ask for one run: `warmup` or a round's number."""
        assert self.process.stdin is not None
        with contextlib.suppress(OSError):  # exited already: wait() says how
            self.process.stdin.write(run + "\n")
            self.process.stdin.flush()

    def ask(self, run: str, timeout: float) -> RunRecord:
        self.send(run)
        return self.wait(timeout)

    def wait(self, timeout: float) -> RunRecord:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise RaceError(f"no result within {timeout:.0f} s") from None
            if line is None:
                tail = " / ".join(self.tail[-3:]) or "no output"
                raise RaceError(f"exited ({self.process.wait()}): {tail}")
            self.tail = [*self.tail[-20:], line.strip()]
            record = self.parser.feed(line)
            if record is not None:
                return record

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.process.stdin is not None
            self.process.stdin.write("stop\n")
            self.process.stdin.close()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def schedule(contenders: Sequence[str], runs: dict[str, int]) -> list[list[str]]:
    """The rounds: round r asks every contender with more than r runs for one, in the
    contenders' order rotated by r (so none always goes first or follows the same one)."""
    rounds = []
    for r in range(max(runs[name] for name in contenders)):
        present = [name for name in contenders if runs[name] > r]
        shift = r % len(present)
        rounds.append(present[shift:] + present[:shift])
    return rounds


def warm_up(contenders: Sequence[Contender], logs: Path, results: dict[str, Result],
            ready_timeout: float, parallel: bool, workers: dict[str, Worker]) -> None:
    """Start each contender's process and wait for its warm-up run (untimed) into `workers`;
    one after another unless `parallel` (faster, but then a compiling peer tunes its
    kernels while others use the GPU; all share one `ready_timeout` then). One not ready in
    time is left out."""
    deadline = time.monotonic() + ready_timeout

    def start(contender: Contender) -> Worker:
        worker = Worker(contender, logs / f"{contender.name}.log")
        if contender.warmup_request:
            worker.send("warmup")
        return worker

    def ready(contender: Contender, worker: Worker) -> None:
        try:
            worker.wait(max(0.0, deadline - time.monotonic()) if parallel else ready_timeout)
            workers[contender.name] = worker
        except RaceError as error:
            results[contender.name].failed = f"warm-up: {error}"
            worker.stop()

    if parallel:
        for contender, worker in [(c, start(c)) for c in contenders]:
            ready(contender, worker)
    else:
        for contender in contenders:
            ready(contender, start(contender))


def race(contenders: Sequence[Contender], logs: Path, *, budget: float | None = None,
         ready_timeout: float = 900, run_timeout: float = 600, parallel_warmup: bool = False,
         on_round: Callable[[dict[str, Result], int], None] | None = None,
         clock: Callable[[], float] = time.monotonic) -> tuple[dict[str, Result], list[str]]:
    """Warm every contender up (see warm_up), then run the rounds of `schedule`. Returns
    the results and notes (what stopped early and why)."""
    start = clock()
    results = {c.name: Result(c.name, c.code, c.trains_in, c.published) for c in contenders}
    workers: dict[str, Worker] = {}
    notes = ["Warm-ups ran at the same time."] if parallel_warmup else []
    try:
        warm_up(contenders, logs, results, ready_timeout, parallel_warmup, workers)
        if on_round is not None:  # the warm-ups' failures kept, should no round fit
            on_round(results, 0)
        names = [c.name for c in contenders if c.name in workers]
        runs = {c.name: c.runs for c in contenders}
        last_round = 0.0
        for number, order in enumerate(schedule(names, runs) if names else []):
            if budget is not None and clock() - start + last_round > budget:
                notes.append(f"stopped after {number} rounds: the next would pass the "
                             f"{budget:.0f} s budget")
                break
            round_start = clock()
            for name in order:
                if results[name].failed:
                    continue
                try:
                    record = workers[name].ask(str(number), run_timeout)
                except RaceError as error:
                    results[name].failed = f"round {number}: {error}"
                    continue
                add_record(results[name], number, record)
            last_round = clock() - round_start
            if on_round is not None:
                on_round(results, number + 1)
    finally:
        for worker in workers.values():
            worker.stop()
    return results, notes


def add_record(result: Result, number: int, record: RunRecord) -> None:
    result.rounds.append(number)
    result.seconds.append(record.seconds)
    result.precision.append(record.precision)
    result.extras.append(record.extra)


# --- the tables ---

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), as the sweep report's
    statistics give them."""
    from cifar_exp.tracking.comparison import spread

    found = spread(list(values))
    return found.mean, 0.0 if math.isnan(found.std) else found.std


def differences(ours: Result, peer: Result) -> tuple[object, object]:
    """Ours minus the peer's (time, precision), each a comparison.Difference or None, paired
    by round where both ran the same rounds."""
    from cifar_exp.tracking.comparison import compare

    def pairs(result: Result, values: list[float]) -> list[tuple[str | None, float]]:
        return [(str(r), v) for r, v in zip(result.rounds, values, strict=True)]

    return (compare(pairs(ours, ours.seconds), pairs(peer, peer.seconds)),
            compare(pairs(ours, ours.precision), pairs(peer, peer.precision)))


def _interval(difference: object, digits: int) -> str:
    if difference is None:
        return "n/a (fewer than 2 runs)"
    d = difference
    return (f"{d.difference:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"  # type: ignore[attr-defined]
            f" ({d.test}, n={d.n})")  # type: ignore[attr-defined]


def _capture(result: Result) -> str:
    captures = [e["capture_seconds"] for e in result.extras if "capture_seconds" in e]
    if not result.code.startswith("cifar_exp"):
        return "(in their warm-up)"
    if not captures:
        return "n/a"
    mean, std = mean_std(captures)
    return f"{mean:.3f} ± {std:.3f}"


def trains_in(result: Result) -> str:
    """The numeric format (and graphs, compile) a contender trains in: ours as its runs
    resolved them, the peers' as their code has it."""
    if not result.extras or "amp" not in result.extras[0]:
        return result.trains_in
    figures = result.extras[0]
    words = [f"{figures['amp']} autocast, fp32 weights" if figures["amp"] != "fp32"
             else "fp32"]
    words += ["CUDA graphs"] if figures.get("cuda_graph") else []
    words += [f"compile {figures['compile']}"] if figures.get("compile", "none") != "none" else []
    return ", ".join(words)


def format_table(results: Sequence[Result], device: str, notes: Sequence[str] = ()) -> str:
    """The race as markdown: a caption, a row per contender, then each recipe against each
    of its peers."""
    lines = [f"Race on {device}; precision with test-time augmentation on {DATA_LABEL}. "
             "Time per run: the same span on both sides, from the first use of the training "
             "data (whitening init) to the last optimizer step, GPU synchronized, all "
             "evaluations excluded, the final TTA evaluation too (the published figures "
             "include it). Every contender ran in a fresh process of its own after one "
             "untimed warm-up run, the runs interleaved round by round. Ours counts building "
             "its parts, its CUDA-graph captures (shown apart) and a host sync at every log "
             "line as the framework's cost. See experiments/race.py.", "",
             "| contender | code | published | trains in | runs | time per run (s) | "
             "of which CUDA-graph capture (s) | precision with TTA |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        failed = f" ({result.failed})" if result.failed else ""
        if not result.seconds:
            lines.append(f"| {result.contender} | {result.code} | {result.published} | "
                         f"{result.trains_in} | 0 | failed{failed} | | |")
            continue
        time_mean, time_std = mean_std(result.seconds)
        precision_mean, precision_std = mean_std(result.precision)
        lines.append(f"| {result.contender} | {result.code} | {result.published} | "
                     f"{trains_in(result)} | {len(result.seconds)}{failed} | "
                     f"{time_mean:.3f} ± {time_std:.3f} | {_capture(result)} | "
                     f"{precision_mean:.4f} ± {precision_std:.4f} |")
    by_name = {result.contender: result for result in results}
    rows = [(name, peer) for name in OURS if name in by_name
            for peer in OURS[name].peers if peer in by_name]
    if rows:
        lines += ["", "Ours minus the peer's, mean with its 95% confidence interval "
                  "(cifar_exp.tracking.comparison; paired by round where both ran the same "
                  "rounds, else Welch):", "",
                  "| recipe | against | time difference (s) | precision difference |",
                  "| --- | --- | --- | --- |"]
        for name, peer in rows:
            time_d, precision_d = differences(by_name[name], by_name[peer])
            lines.append(f"| {name} | {by_name[peer].code} | {_interval(time_d, 3)} | "
                         f"{_interval(precision_d, 4)} |")
    lines += ["", *notes] if notes else []
    return "\n".join(lines)


# --- our worker: one contender's process, one run per request on stdin ---

def timed_captures() -> list[float]:
    """Seconds of each CUDA-graph capture from now on (a wrapper around the capture, which
    synchronizes the GPU itself); empty where the step-graph code has no such method."""
    from cifar_exp.training import step_graph

    durations: list[float] = []
    original = getattr(step_graph.StepGraphs, "_capture", None)
    if original is None:
        return durations

    def timed(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            durations.append(time.perf_counter() - start)

    step_graph.StepGraphs._capture = timed  # type: ignore[method-assign]
    return durations


def our_run(overrides: list[str], seed: int, data, captures: list[float]) -> dict:  # noqa: ANN001
    """One run of ours, timed over the race's span; its figures as a dict."""
    from cifar_exp.config import compose_config, validate
    from cifar_exp.training.build import build_parts
    from cifar_exp.training.loop import train
    from cifar_exp.training.step import synchronize

    class NoSink:
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            pass

    cfg = compose_config([*overrides, f"seed={seed}"])
    validate(cfg)
    device = data.train_images.device
    captures.clear()
    synchronize(device)
    start = time.perf_counter()
    parts = build_parts(cfg, data, shares_console=True)  # whitening init: the data's first use
    synchronize(device)
    built = time.perf_counter()
    trained = train(parts, data, NoSink())
    end = time.perf_counter()
    return {"seconds": end - start - trained.eval_seconds, "precision": trained.precision,
            "build_seconds": built - start, "train_seconds": trained.train_seconds,
            "capture_seconds": sum(captures), "captures": len(captures),
            "amp": parts.settings.amp, "cuda_graph": bool(parts.settings.cuda_graph),
            "compile": str(parts.settings.compile),
            "host_syncs": math.ceil(cfg.steps / cfg.log_every)}


def our_overrides(name: str, data_root: str | None, device: str,
                  extra: Sequence[str] = ()) -> list[str]:
    overrides = [OURS[name].override, f"device={device}", "tracking.log_model=false",
                 "checkpoint.enabled=false", *extra]
    return overrides + ([f"data.root={data_root}"] if data_root is not None else [])


def worker_main(name: str, data_root: str | None, device: str, extra: Sequence[str]) -> int:
    """Our contender's process: load the data once, then one run per stdin line (`warmup`,
    a round's number, or `stop`), each printed as a RESULT_PREFIX line."""
    from cifar_exp.config import compose_config
    from cifar_exp.data import load_cifar

    overrides = our_overrides(name, data_root, device, extra)
    cfg = compose_config(overrides)
    data = load_cifar(cfg.data.name, cfg.data.root)
    if cfg.eval_images is not None:  # quick checks only
        data = data.first_test_images(cfg.eval_images)
    data = data.to(device)
    captures = timed_captures()
    for line in sys.stdin:
        run = line.strip()
        if run == "stop":
            break
        seed = WARMUP_SEED if run == "warmup" else int(run)
        figures = our_run(overrides, seed, data, captures)
        print(RESULT_PREFIX + json.dumps({"run": run, **figures}), flush=True)
    return 0


# --- the command ---

def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python experiments/race.py",
        description="Race fast94, fast94_muon and fast96 against the airbench scripts they "
                    "follow (from --peers), fairly, on one GPU; see the file's docstring.")
    parser.add_argument("--peers", type=Path, default=REPO / "peers",
                        help="folder holding the peers' files, <name>@<rev>.py (default: "
                             "peers/ at the repository root)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated subset of " + ", ".join(CONTENDERS))
    parser.add_argument("--runs", type=int, default=25,
                        help=f"timed runs per contender (default 25; {SLOW_RUNS} for "
                             f"{', '.join(SLOW)})")
    parser.add_argument("--runs-of", action="append", default=[], metavar="NAME=N",
                        help="timed runs of one contender (repeatable)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="start no round that would end past this many seconds")
    parser.add_argument("--ready-timeout", type=float, default=900, metavar="SECONDS",
                        help="longest warm-up (compiling included) before a contender is "
                             "left out")
    parser.add_argument("--run-timeout", type=float, default=600, metavar="SECONDS")
    parser.add_argument("--parallel-warmup", action="store_true",
                        help="warm all contenders up at once (saves the compiling peers' "
                             "minutes; their autotuning then shares the GPU)")
    parser.add_argument("--data", default=None,
                        help="folder holding cifar-10-batches-bin/ (default: $CIFAR_EXP_DATA)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the logs, results.json and race.md (default: a "
                             "temporary folder)")
    parser.add_argument("--table", type=Path, default=None,
                        help="also write the markdown tables here after every round")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python that runs every contender")
    parser.add_argument("--override", action="append", default=[],
                        help="an extra override for our runs (smoke tests only)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the peers' files and patches and compose our runs; "
                             "print the plan; no GPU needed")
    parser.add_argument("--export-from", type=Path, metavar="GIT_DIR",
                        help="write the peers' files from this clone of "
                             f"{PEER_REPOSITORY} into --peers, then check them")
    parser.add_argument("--worker", choices=sorted(OURS), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, checked: an unknown contender or a bad run count ends the program
    with a one-line error."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    args.contenders = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = sorted(set(args.contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose among {', '.join(CONTENDERS)}")
    try:
        args.runs_by_name = runs_by_name(args.contenders, args.runs, args.runs_of)
    except RaceError as error:
        parser.error(str(error))
    return args


def runs_by_name(contenders: Sequence[str], runs: int, runs_of: Sequence[str]
                 ) -> dict[str, int]:
    """Timed runs per contender: `runs`, SLOW_RUNS for the slow ones, then `NAME=N`s."""
    counts = {name: min(runs, SLOW_RUNS) if name in SLOW else runs for name in contenders}
    for item in runs_of:
        name, _, number = item.partition("=")
        if name not in counts or not number.isdigit():
            raise RaceError(f"--runs-of {item}: give NAME=N for a chosen contender")
        counts[name] = int(number)
    if any(count < 1 for count in counts.values()):
        raise RaceError(f"every contender needs at least 1 run: {counts}")
    return counts


def check_plan(args: argparse.Namespace) -> list[str]:
    """Every problem that would stop the race (none: it can start): peer files, their
    revisions and patches, our runs' configs."""
    from cifar_exp.config import compose_config, validate
    from cifar_exp.errors import UserError

    problems = []
    for name in args.contenders:
        try:
            if name in PEERS:
                check_peer(name, args.peers)
            else:
                validate(compose_config(our_overrides(name, args.data, "cuda", args.override)))
        except (RaceError, UserError) as error:
            problems.append(f"{name}: {error}")
    return problems


def plan_lines(args: argparse.Namespace) -> list[str]:
    lines = []
    for name in args.contenders:
        runs = args.runs_by_name[name]
        if name in PEERS:
            peer = PEERS[name]
            lines.append(f"{name}: {peer.path} @ {peer.revision} ({args.peers / peer.file}), "
                         f"{runs} runs, '{peer.runs_line}' -> 'for run in {RUNS_FROM_STDIN}'")
        else:
            lines.append(f"{name}: cifar_exp {OURS[name].override}, {runs} runs, against "
                         f"{', '.join(OURS[name].peers)}")
    budget = f"{args.budget:.0f} s budget" if args.budget else "no budget"
    lines.append(f"rounds: {max(args.runs_by_name.values())}, {budget}")
    return lines


def contenders_for(args: argparse.Namespace, workdir: Path) -> list[Contender]:
    """The processes to start: the patched peers in `workdir`, ours as --worker."""
    contenders = []
    for name in args.contenders:
        runs = args.runs_by_name[name]
        if name in PEERS:
            peer = PEERS[name]
            (workdir / f"{name}.py").write_text(check_peer(name, args.peers))
            contenders.append(Contender(
                name, [args.python, "-u", f"{name}.py"], workdir, PeerTable,
                not peer.own_warmup, runs, f"{peer.path} @ {peer.revision}", peer.trains_in,
                peer.published))
        else:
            command = [args.python, "-u", str(Path(__file__).resolve()), "--worker", name]
            command += [*(["--data", args.data] if args.data else []),
                        *(f"--override={o}" for o in args.override)]
            contenders.append(Contender(name, command, REPO, OurLines, True, runs,
                                        f"cifar_exp {OURS[name].override}",
                                        "bf16 autocast, fp32 weights (amp=auto)"))
    return contenders


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


@contextlib.contextmanager
def results_folder(out: Path | None) -> Iterator[Path]:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="race_") as temporary:
        yield Path(temporary)


def run_race(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("race.py: needs a CUDA GPU (the peers' code runs on CUDA only)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    with results_folder(args.out) as out, tempfile.TemporaryDirectory(prefix="race_") as tmp:
        workdir = Path(tmp)
        if any(name in PEERS for name in args.contenders):
            write_peer_data(workdir, args.data)

        def save(results: dict[str, Result], rounds: int, notes: Sequence[str] = ()) -> str:
            table = format_table(list(results.values()), device,
                                 [*notes, f"Rounds done: {rounds}."])
            (out / "results.json").write_text(json.dumps(
                [asdict(r) for r in results.values()], indent=1))
            for path in (out / "race.md", args.table):
                if path is not None:
                    path.write_text(table + "\n")
            return table

        results, notes = race(contenders_for(args, workdir), out, budget=args.budget,
                              ready_timeout=args.ready_timeout, run_timeout=args.run_timeout,
                              parallel_warmup=args.parallel_warmup, on_round=save)
        rounds = max((len(r.seconds) for r in results.values()), default=0)
        print("\n" + save(results, rounds, notes))
    return 0 if all(result.seconds for result in results.values()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # cifar_exp from this checkout, in every process
    if args.worker:
        return worker_main(args.worker, args.data, args.device, args.override)
    if args.export_from:
        try:
            written = export_peers(args.export_from, args.peers,
                                   [n for n in args.contenders if n in PEERS])
        except RaceError as error:
            print(f"race.py: {error}", file=sys.stderr)
            return 2
        print(f"wrote {len(written)} peer files into {args.peers}")
    problems = check_plan(args)
    if args.dry_run or args.export_from:
        print("\n".join(plan_lines(args)))
        for problem in problems:
            print(f"would fail: {problem}", file=sys.stderr)
        print("race plan: " + ("would fail" if problems else "ok, every patch applies once"))
        return 1 if problems else 0
    if problems:
        print("race.py: " + "; ".join(problems), file=sys.stderr)
        return 2
    return run_race(args)


if __name__ == "__main__":
    sys.exit(main())
