"""Summarize runs of an MLflow store as a markdown table and PNG plots.

    python -m cifar_exp.report                         # every run of experiment cifar_exp
    python -m cifar_exp.report --parent RUN_ID         # the jobs of one sweep
    python -m cifar_exp.report --experiment NAME --tracking-uri sqlite:///mlflow.db --out DIR

The folder gets report.md, curves.png (loss and precision per run, overlaid),
params.png (each swept value against precision) and speed.png (examples/sec per run).
A sweep's report is also logged to its parent run, under report/.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from cifar_exp.errors import ConfigError, UserError, one_line
from cifar_exp.redact import redact
from cifar_exp.store import check_tracking_uri

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVES = ("loss", "precision")
SEED_KEY = "seed"
MAX_LEGEND = 12  # beyond this many runs a legend hides the plot


@dataclass
class RunSummary:
    run_id: str
    name: str
    status: str
    overrides: dict[str, str]
    precision: float
    examples_per_sec: float  # median of the logged windows: warm-up does not skew it
    wall_seconds: float
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Report:
    folder: Path
    markdown: str
    runs: list[RunSummary]
    swept: list[str]
    best: RunSummary | None
    plots: list[Path]


def parse_overrides(text: str) -> dict[str, str]:
    """'optimizer=sgd seed=1' -> {'optimizer': 'sgd', 'seed': '1'} (Hydra's +/~ prefixes
    dropped)."""
    pairs = (item.split("=", 1) for item in text.split() if "=" in item)
    return {key.lstrip("+~"): value for key, value in pairs}


def find_runs(client: MlflowClient, experiment: str, parent: str | None) -> list[Run]:
    """The jobs of sweep `parent`, or every training run of `experiment` (sweep parents
    left out), oldest first."""
    if parent is not None:
        try:
            parent_run = client.get_run(parent)
        except Exception as error:
            raise ConfigError(f"no run {parent} in the tracking store; give the id of a "
                              f"sweep's parent run (see the sweep's log or the MLflow UI)"
                              ) from error
        query = f"tags.`mlflow.parentRunId` = '{parent}'"
        experiment_ids = [parent_run.info.experiment_id]
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ConfigError(f"no experiment {experiment!r} in the tracking store; check "
                              f"--experiment and --tracking-uri")
        query = ""
        experiment_ids = [found.experiment_id]
    runs = client.search_runs(experiment_ids, query, order_by=["attributes.start_time ASC"],
                              max_results=5000)
    return [run for run in runs if run.data.tags.get("sweep") != "parent"]


def summarize(client: MlflowClient, run: Run) -> RunSummary:
    histories = {key: sorted((m.step, m.value) for m in client.get_metric_history(
        run.info.run_id, key)) for key in (*CURVES, "examples_per_sec")}
    speeds = [value for _, value in histories.pop("examples_per_sec")]
    end = run.info.end_time or run.info.start_time
    return RunSummary(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id[:8],
        status=run.info.status,
        overrides=parse_overrides(run.data.tags.get("overrides", "")),
        precision=run.data.metrics.get("precision", math.nan),
        examples_per_sec=statistics.median(speeds) if speeds else math.nan,
        wall_seconds=(end - run.info.start_time) / 1000,
        histories=histories,
    )


def swept_keys(runs: list[RunSummary]) -> list[str]:
    """Override keys whose value differs between runs: what the sweep varied."""
    keys = sorted({key for run in runs for key in run.overrides})
    return [key for key in keys if len({run.overrides.get(key) for run in runs}) > 1]


def _format(value: str | float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return value if number.is_integer() and "e" not in value.lower() else f"{number:.4g}"
    return "-" if math.isnan(value) else f"{value:.4f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def runs_table(runs: list[RunSummary], keys: list[str]) -> str:
    """One row per run, best precision first."""
    header = ["run", *keys, "status", "precision", "examples/sec", "wall time (s)"]
    lines = [_row(header), _row(["---"] * len(header))]
    ordered = sorted(runs, key=lambda r: -r.precision if not math.isnan(r.precision) else 1)
    for run in ordered:
        lines.append(_row([run.name, *(_format(run.overrides.get(k)) for k in keys),
                           run.status, _format(run.precision), f"{run.examples_per_sec:,.0f}"
                           if not math.isnan(run.examples_per_sec) else "-",
                           f"{run.wall_seconds:.1f}"]))
    return "\n".join(lines)


def seed_table(runs: list[RunSummary], keys: list[str]) -> str | None:
    """Mean ± sample std of precision over seeds for each configuration, when some
    configuration ran with more than one seed; None otherwise."""
    if SEED_KEY not in keys:
        return None
    config_keys = [key for key in keys if key != SEED_KEY]
    groups: dict[tuple, list[RunSummary]] = defaultdict(list)
    for run in runs:
        groups[tuple(run.overrides.get(key) for key in config_keys)].append(run)
    header = [*config_keys, "seeds", "precision (mean ± std)", "examples/sec (mean)"]
    lines = [_row(header), _row(["---"] * len(header))]
    for values, members in groups.items():
        precisions = [run.precision for run in members if not math.isnan(run.precision)]
        speeds = [run.examples_per_sec for run in members if not math.isnan(run.examples_per_sec)]
        if len(precisions) > 1:
            cell = f"{statistics.mean(precisions):.4f} ± {statistics.stdev(precisions):.4f}"
        else:
            cell = _format(precisions[0] if precisions else math.nan)
        speed = f"{statistics.mean(speeds):,.0f}" if speeds else "-"
        lines.append(_row([*(_format(v) for v in values), str(len(members)), cell, speed]))
    return "\n".join(lines)


def _label(run: RunSummary, keys: list[str]) -> str:
    swept = " ".join(f"{key}={_format(run.overrides.get(key))}" for key in keys)
    return swept or run.name


def _figure(**options: Any) -> Figure:
    # matplotlib is imported here: it adds half a second to every run's start, and only
    # reports draw.
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **options)


def plot_curves(runs: list[RunSummary], keys: list[str], path: Path) -> None:
    figure = _figure(figsize=(11, 4))
    axes = figure.subplots(1, len(CURVES))
    for ax, metric in zip(axes, CURVES, strict=True):
        for run in runs:
            points = run.histories.get(metric, [])
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="." if len(points) < 20 else None,
                        label=_label(run, keys))
        ax.set(xlabel="step", ylabel=metric, title=f"{metric} per run")
        ax.grid(alpha=0.3)
    if len(runs) <= MAX_LEGEND:
        axes[-1].legend(fontsize="small")
    figure.savefig(path, dpi=100)


def _numeric(values: list[str | None]) -> list[float] | None:
    try:
        return [float(value) for value in values]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def plot_params(runs: list[RunSummary], keys: list[str], path: Path) -> bool:
    """Precision against each swept value (seeds pooled); False when nothing was swept."""
    keys = [key for key in keys if key != SEED_KEY]
    if not keys:
        return False
    figure = _figure(figsize=(4 * len(keys), 3.5))
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    precisions = [run.precision for run in runs]
    for ax, key in zip(axes, keys, strict=True):
        values = [run.overrides.get(key) for run in runs]
        numbers = _numeric(values)
        if numbers is not None:
            ax.scatter(numbers, precisions)
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 20:
                ax.set_xscale("log")
        else:
            categories = sorted({str(value) for value in values})
            ax.scatter([categories.index(str(value)) for value in values], precisions)
            ax.set_xticks(range(len(categories)), categories, rotation=20)
        ax.set(xlabel=key, ylabel="precision", title=f"precision vs {key}")
        ax.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
    return True


def plot_speed(runs: list[RunSummary], keys: list[str], path: Path) -> None:
    figure = _figure(figsize=(8, 0.6 + 0.35 * len(runs)))
    ax = figure.subplots()
    labels = [_label(run, keys) for run in runs]
    ax.barh(range(len(runs)), [run.examples_per_sec for run in runs])
    ax.set_yticks(range(len(runs)), labels, fontsize="small")
    ax.invert_yaxis()
    ax.set(xlabel="examples/sec (median over log windows)", title="training speed per run")
    ax.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=100)


def write_report(uri: str, folder: Path, experiment: str = "cifar_exp",
                 parent: str | None = None, progress: bool = True) -> Report:
    """Read the runs from the store at `uri`, write report.md and the plots into `folder`,
    and log them to `parent` (when given) under report/, with the table as its note."""
    check_tracking_uri(uri, must_exist=True)
    check_output_folder(folder)
    client = MlflowClient(uri)
    try:
        found = find_runs(client, experiment, parent)
    except MlflowException as error:  # e.g. a store of an older MLflow, never upgraded here
        raise ConfigError(f"cannot read the tracking store {redact(uri)} "
                          f"({one_line(error)})") from error
    if not found:
        raise ConfigError(f"no runs to report in {parent or experiment!r} at {uri}")
    runs = [summarize(client, run) for run in tqdm(found, desc="reading runs", unit="run",
                                                     disable=not progress or None)]
    keys = swept_keys(runs)
    folder.mkdir(parents=True, exist_ok=True)
    finished = [run for run in runs if not math.isnan(run.precision)]
    best = max(finished, key=lambda run: run.precision) if finished else None

    plots = [folder / "curves.png", folder / "speed.png"]
    plot_curves(runs, keys, plots[0])
    plot_speed(runs, keys, plots[1])
    if plot_params(runs, keys, folder / "params.png"):
        plots.append(folder / "params.png")

    title = f"sweep {parent}" if parent else f"experiment {experiment}"
    sections = [f"# Report: {title}", f"{len(runs)} runs, tracking store {uri}.",
                runs_table(runs, keys)]
    if best is not None:
        sections.append(f"Best: **{best.name}** ({_label(best, keys)}), precision "
                        f"{best.precision:.4f}.")
    if (seeds := seed_table(runs, keys)) is not None:
        sections += ["## Over seeds", seeds]
    sections.append("\n".join(f"![{plot.stem}]({plot.name})" for plot in plots))
    markdown = "\n\n".join(sections) + "\n"
    (folder / "report.md").write_text(markdown)

    if parent is not None:
        client.log_artifacts(parent, str(folder), "report")
        client.set_tag(parent, "mlflow.note.content", markdown)  # shown on the run's page
    return Report(folder, markdown, runs, keys, best, plots)


def check_output_folder(folder: Path) -> None:
    """Refuse, before reading any run, an output folder that is a file or cannot be made."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; give a folder for the report")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {folder} cannot be made ({error.strerror}); give another "
                          f"folder") from error
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--out {folder} cannot be written (no permission); give another "
                          f"folder")


def default_folder(name: str) -> Path:
    """reports/<name>, with the name made a single safe folder name: an experiment called
    `../x` must not write outside reports/."""
    safe = re.sub(r"[^\w.-]+", "_", name).lstrip(".") or "_"
    return Path("reports") / safe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_exp.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="cifar_exp", help="experiment name")
    parser.add_argument("--parent", help="a sweep's parent run id: report its jobs")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--out", type=Path, help="folder (default reports/<parent or name>)")
    args = parser.parse_args(argv)
    folder = args.out or default_folder(args.parent or args.experiment)
    try:
        report = write_report(args.tracking_uri, folder, args.experiment, args.parent)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.markdown)
    print(f"report written to {folder}/" + (" and logged to the parent run" if args.parent
                                              else ""))
    return 0

