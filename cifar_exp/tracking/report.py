"""Summarize runs of an MLflow store as a markdown table and PNG plots.

    python -m cifar_exp.report                         # every run of experiment cifar_exp
    python -m cifar_exp.report --parent RUN_ID         # the jobs of one sweep
    python -m cifar_exp.report --experiment NAME --tracking-uri URI --out DIR
    python -m cifar_exp.report --parent RUN_ID --baseline optimizer=adam

The folder gets report.md, curves.png (loss and precision per run, overlaid),
params.png (each swept value against precision) and speed.png (examples/sec per run).
report.md compares the configurations' precision per class too, where runs logged their
class results. With a baseline (`key=value ...`, one configuration), each other
configuration's difference of precision from it, with its 95% interval and a verdict, also
in comparison.csv (cifar_exp.tracking.comparison). A sweep's report is also logged to its
parent run, under report/, and shown on its page.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from cifar_exp.config import DEFAULT_TRACKING_URI
from cifar_exp.errors import CommandParser, ConfigError, UserError, one_line, refused
from cifar_exp.tracking.class_results import logged_precision
from cifar_exp.tracking.comparison import Difference, Spread, compare, spread
from cifar_exp.tracking.naming import short_keys, short_number
from cifar_exp.tracking.redact import redact, redacted
from cifar_exp.tracking.store import check_tracking_uri

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVES = ("loss", "precision")
SEED_KEY = "seed"
MAX_LEGEND = 8  # beyond this many runs a legend is no help: the table names them
# The MLflow UI shows the report's plots at their own size on the run's page (its note
# allows no style): no wider than the page's column beside its side panel, at 100 dpi.
PAGE_INCHES = 7.5
NBSP_PADDING = "&nbsp;&nbsp;"  # the MLflow UI shows a note's table cells with no padding
CLASS_TABLE_NOTE = ("Each configuration's precision @ 1 over the test images of each class, "
                    "the mean over its runs (seeds) that logged class results; of several "
                    "configurations, the best of each class in bold.")


@dataclass(kw_only=True)
class RunSummary:
    run_id: str
    name: str
    status: str
    overrides: dict[str, str]
    precision: float
    examples_per_sec: float  # median of the logged windows: warm-up does not skew it
    wall_seconds: float
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # the run's whole config, flat
    eval_images: int | None = None  # scored on the first N test images; None: all
    precision_top5: float = math.nan  # nan: not logged (runs from before it was)
    # Class name -> precision, from the run's class results; empty: none logged (a run
    # from before they were, or one that did not finish).
    class_precision: dict[str, float] = field(default_factory=dict)

    def value(self, key: str) -> str | None:
        """The run's value of `key` (an override key): as overridden, else from its
        config (`optimizer` is `optimizer.name` there)."""
        for found in (self.overrides.get(key), self.params.get(key),
                      self.params.get(f"{key}.name")):
            if found is not None:
                return found
        return None


@dataclass
class Report:
    folder: Path
    markdown: str
    runs: list[RunSummary]
    swept: list[str]
    best: RunSummary | None
    plots: list[Path]
    # Each other configuration's label and its difference from the baseline (None: too few
    # runs to compare); empty without a baseline.
    comparisons: dict[str, Difference | None] = field(default_factory=dict)


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
    eval_images = run.data.params.get("eval_images", "None")
    # Masked as read: runs recorded before a spelling was masked (or by other tools) may
    # hold credentials, which the table and the plots would show.
    return RunSummary(
        run_id=run.info.run_id,
        name=redact(run.info.run_name or run.info.run_id[:8]),
        status=run.info.status,
        overrides=parse_overrides(redact(run.data.tags.get("overrides", ""))),
        precision=run.data.metrics.get("precision", math.nan),
        examples_per_sec=statistics.median(speeds) if speeds else math.nan,
        wall_seconds=(end - run.info.start_time) / 1000,
        histories=histories,
        params=redacted(dict(run.data.params)),
        eval_images=int(eval_images) if eval_images.isdigit() else None,
        precision_top5=run.data.metrics.get("precision_top5", math.nan),
        class_precision=logged_precision(client, run.info.run_id),
    )


def swept_keys(runs: list[RunSummary]) -> list[str]:
    """Override keys whose value differs between runs: what the sweep varied."""
    keys = sorted({key for run in runs for key in run.overrides})
    return [key for key in keys if len({run.value(key) for run in runs}) > 1]


def _format(value: str | float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return short_number(value)
    return "-" if math.isnan(value) else f"{value:.4f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _with_top5(runs: list[RunSummary]) -> bool:
    """Whether a column of top-5 precision is due: some run logged it."""
    return any(not math.isnan(run.precision_top5) for run in runs)


def runs_table(runs: list[RunSummary], keys: list[str]) -> str:
    """One row per run, best precision first; a precision measured on part of the test set
    is marked, and ranked after every one measured on all of it. Top-5 precision follows
    precision where some run logged it."""
    top5 = _with_top5(runs)
    header = ["run", *keys, "status", "precision", *(["precision_top5"] if top5 else []),
              "examples/sec", "wall time (s)"]
    lines = [_row(header), _row(["---"] * len(header))]
    for run in sorted(runs, key=_rank):
        partial = f" ({run.eval_images} images)" if run.eval_images is not None else ""
        lines.append(_row([run.name, *(_format(run.value(k)) for k in keys),
                           run.status, _format(run.precision) + partial,
                           *([_format(run.precision_top5)] if top5 else []),
                           f"{run.examples_per_sec:,.0f}"
                           if not math.isnan(run.examples_per_sec) else "-",
                           f"{run.wall_seconds:.1f}"]))
    return "\n".join(lines)


def _rank(run: RunSummary) -> tuple[bool, float]:
    """Whole-test-set runs first, then by precision, best first (nan last)."""
    return run.eval_images is not None, -run.precision if not math.isnan(run.precision) else 1


def configurations(runs: list[RunSummary], config_keys: list[str]
                   ) -> dict[tuple[str | None, ...], list[RunSummary]]:
    """The runs by their values of `config_keys` (the swept keys but the seed), in the
    order the configurations first come."""
    groups: dict[tuple[str | None, ...], list[RunSummary]] = defaultdict(list)
    for run in runs:
        groups[tuple(run.value(key) for key in config_keys)].append(run)
    return groups


def seed_table(runs: list[RunSummary], keys: list[str]) -> str | None:
    """Mean ± sample std of precision over seeds for each configuration, when some
    configuration ran with more than one seed; None otherwise."""
    if SEED_KEY not in keys:
        return None
    config_keys = [key for key in keys if key != SEED_KEY]
    groups = configurations(runs, config_keys)
    top5 = _with_top5(runs)
    header = [*config_keys, "seeds", "precision (mean ± std)", "precision 95% CI",
              *(["precision_top5 (mean ± std)"] if top5 else []), "examples/sec (mean)"]
    lines = [_row(header), _row(["---"] * len(header))]
    for values, members in groups.items():
        speeds = [run.examples_per_sec for run in members if not math.isnan(run.examples_per_sec)]
        speed = f"{statistics.mean(speeds):,.0f}" if speeds else "-"
        cells = [_mean_std([run.precision for run in members]),
                 _interval(spread([run.precision for run in members])),
                 *([_mean_std([run.precision_top5 for run in members])] if top5 else [])]
        lines.append(_row([*(_format(v) for v in values), str(len(members)), *cells, speed]))
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    """Mean ± sample std of the values that are not nan (one alone: itself; none: -)."""
    known = [value for value in values if not math.isnan(value)]
    if len(known) > 1:
        return f"{statistics.mean(known):.4f} ± {statistics.stdev(known):.4f}"
    return _format(known[0] if known else math.nan)


def _interval(found: Spread | Difference) -> str:
    """[low, high] of a 95% interval; - where there is none (fewer than two runs)."""
    if math.isnan(found.low):
        return "-"
    return f"[{found.low:.4f}, {found.high:.4f}]"


def baseline_values(groups: dict[tuple[str | None, ...], list[RunSummary]],
                    config_keys: list[str], baseline: str) -> tuple[str | None, ...]:
    """The one configuration that `baseline` (`key=value ...`) names."""
    wanted = parse_overrides(baseline)
    if not wanted:
        raise ConfigError(f"--baseline {baseline!r}: give key=value, e.g. optimizer=adam")
    if unknown := [key for key in wanted if key not in config_keys]:
        raise ConfigError(f"--baseline names {', '.join(unknown)}, which the runs do not "
                          f"vary; they vary: {', '.join(config_keys) or 'only the seed'}")
    matches = [values for values in groups if all(
        _same(values[config_keys.index(key)], value) for key, value in wanted.items())]
    if len(matches) != 1:
        found = "; ".join(_values_label(values, config_keys) for values in groups)
        raise ConfigError(f"--baseline {baseline} names {len(matches)} configurations, not "
                          f"one; name one of: {found}")
    return matches[0]


def _same(value: str | None, wanted: str) -> bool:
    """Equal as text, or as numbers (`0.010` is `0.01`)."""
    if value == wanted:
        return True
    numbers = _numeric([value, wanted])
    return numbers is not None and numbers[0] == numbers[1]


def comparisons(runs: list[RunSummary], keys: list[str], baseline: str
                ) -> dict[str, Difference | None]:
    """Each configuration but the baseline, by label: its precision's difference from the
    baseline's, paired by seed where both ran the same seeds."""
    config_keys = [key for key in keys if key != SEED_KEY]
    groups = configurations(runs, config_keys)
    base = baseline_values(groups, config_keys, baseline)
    seeds = {values: [(run.value(SEED_KEY), run.precision) for run in members]
             for values, members in groups.items()}
    return {_values_label(values, config_keys): compare(found, seeds[base])
            for values, found in seeds.items() if values != base}


TOO_FEW = "too few runs (2 each needed)"
COMPARISON_COLUMNS = ("configuration", "test", "n", "n_baseline", "difference", "ci_low",
                      "ci_high", "verdict", "seeds_needed")


def comparison_rows(found: dict[str, Difference | None]) -> list[dict[str, Any]]:
    """The comparisons as rows of COMPARISON_COLUMNS (comparison.csv, the table)."""
    rows = []
    for label, difference in found.items():
        if difference is None:
            rows.append({"configuration": label, "verdict": TOO_FEW})
            continue
        rows.append({"configuration": label, "test": difference.test, "n": difference.n,
                     "n_baseline": difference.n_baseline,
                     "difference": difference.difference, "ci_low": difference.low,
                     "ci_high": difference.high, "verdict": difference.verdict,
                     "seeds_needed": difference.seeds_needed})
    return rows


def comparison_table(found: dict[str, Difference | None]) -> str:
    header = ["configuration", "test", "n", "difference", "95% CI", "verdict",
              "seeds needed"]
    lines = [_row(header), _row(["---"] * len(header))]
    for label, difference in found.items():
        if difference is None:
            lines.append(_row([label, "-", "-", "-", "-", TOO_FEW, "-"]))
            continue
        n = (str(difference.n) if difference.test == "paired"
             else f"{difference.n} vs {difference.n_baseline}")
        kind = "paired" if difference.test == "paired" else "each, unpaired"
        needed = f"{difference.seeds_needed} ({kind})" if difference.seeds_needed else "-"
        lines.append(_row([label, difference.test, n, f"{difference.difference:+.4f}",
                           _interval(difference), difference.verdict, needed]))
    return "\n".join(lines)


def comparison_note(baseline: str) -> str:
    return (f"Each configuration's mean precision minus the baseline's ({baseline}), with "
            f"its 95% confidence interval: paired t on the per-seed differences where both "
            f"ran the same seeds, else Welch's t. Better or worse where the interval leaves "
            f"out 0. Seeds needed: how many would show the observed difference at the 5% "
            f"level with 80% power, from the observed std (normal approximation, which "
            f"counts a seed or two short below about 10; paired: of the per-seed "
            f"differences; unpaired: per configuration).")


def write_comparison_csv(found: dict[str, Difference | None], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, COMPARISON_COLUMNS)
        writer.writeheader()
        writer.writerows(comparison_rows(found))


def comparison_metrics(found: dict[str, Difference | None]) -> dict[str, float]:
    """The comparisons as the parent's metrics, vs_baseline/<configuration>/<what>: the
    configuration's label in the characters MLflow allows in a metric's name."""
    metrics = {}
    for label, difference in found.items():
        if difference is None:
            continue
        name = "vs_baseline/" + re.sub(r"[^\w.\- ]", "_", label)
        metrics |= {f"{name}/difference": difference.difference,
                    f"{name}/ci_low": difference.low, f"{name}/ci_high": difference.high}
        if difference.seeds_needed is not None:
            metrics[f"{name}/seeds_needed"] = float(difference.seeds_needed)
    return metrics


def class_table(runs: list[RunSummary], keys: list[str]) -> str | None:
    """Precision per class (a row each) for each configuration (a column each, named by
    its values of the swept keys but the seed): the mean over its runs that logged class
    results, the best of each row in bold. None where no run logged them (older runs)."""
    config_keys = [key for key in keys if key != SEED_KEY]
    logged = {values: [run.class_precision for run in members if run.class_precision]
              for values, members in configurations(runs, config_keys).items()}
    logged = {values: tables for values, tables in logged.items() if tables}
    if not logged:
        return None
    classes = list(dict.fromkeys(name for tables in logged.values() for table in tables
                                 for name in table))
    names = [f"{_values_label(values, config_keys) or 'all runs'} ({len(tables)} "
             f"run{'s' if len(tables) > 1 else ''})" for values, tables in logged.items()]
    lines = [_row(["class", *names]), _row(["---"] * (len(names) + 1))]
    for name in classes:
        means = [_mean_of(name, tables) for tables in logged.values()]
        best = max((mean for mean in means if not math.isnan(mean)), default=math.nan)
        cells = [f"**{_format(mean)}**" if mean == best and len(means) > 1 else _format(mean)
                 for mean in means]
        lines.append(_row([name, *cells]))
    return "\n".join(lines)


def _mean_of(name: str, tables: list[dict[str, float]]) -> float:
    """The mean of class `name`'s precision over the tables that hold it; nan in none."""
    known = [table[name] for table in tables if name in table]
    return statistics.mean(known) if known else math.nan


def _values_label(values: tuple[str | None, ...], keys: list[str]) -> str:
    """Values of `keys` as `key=value ...`, the keys cut short ("" without keys)."""
    return " ".join(f"{short}={_format(value)}" for short, value
                    in zip(short_keys(keys), values, strict=True))


def _label(run: RunSummary, keys: list[str]) -> str:
    """What tells the run apart: its values of the swept keys, the keys cut short."""
    return _values_label(tuple(run.value(key) for key in keys), keys) or run.name


def _figure(**options: Any) -> Figure:
    # matplotlib is imported here: it adds half a second to every run's start, and only
    # reports draw.
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **options)


def plot_curves(runs: list[RunSummary], keys: list[str], path: Path) -> None:
    """Loss and precision against the step, a line per run; the legend under the plots
    (never over the curves, and the figure no wider than the page), left out past
    MAX_LEGEND runs, when the table names them."""
    legend = len(runs) <= MAX_LEGEND
    legend_rows = math.ceil(len(runs) / 2) if legend else 0
    figure = _figure(figsize=(PAGE_INCHES, 3.4 + 0.22 * legend_rows))
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
    if legend:
        handles, labels = max((ax.get_legend_handles_labels() for ax in axes),
                              key=lambda found: len(found[0]))
        figure.legend(handles, labels, loc="outside lower center", ncols=2,
                      fontsize="small", frameon=False)
    else:
        figure.suptitle(f"{len(runs)} runs: the table tells them apart", fontsize="small")
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
    from matplotlib.ticker import NullFormatter

    columns = min(len(keys), 2)  # two to a row: the figure no wider than the page
    rows = math.ceil(len(keys) / columns)
    figure = _figure(figsize=(PAGE_INCHES / 2 * columns, 3.4 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for unused in axes[len(keys):]:
        unused.set_axis_off()
    precisions = [run.precision for run in runs]
    for ax, key in zip(axes, keys, strict=False):
        values = [run.overrides.get(key) for run in runs]
        numbers = _numeric(values)
        if numbers is not None:
            ax.scatter(numbers, precisions)
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 20:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minors overlap
        else:
            categories = sorted({str(value) for value in values})
            ax.scatter([categories.index(str(value)) for value in values], precisions)
            ax.set_xticks(range(len(categories)), categories, rotation=20)
        ax.set(xlabel=key, ylabel="precision", title=f"precision vs {key}")
        ax.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
    return True


def plot_speed(runs: list[RunSummary], keys: list[str], path: Path) -> None:
    figure = _figure(figsize=(PAGE_INCHES, 0.6 + 0.35 * len(runs)))
    ax = figure.subplots()
    labels = [_label(run, keys) for run in runs]
    ax.barh(range(len(runs)), [run.examples_per_sec for run in runs])
    ax.set_yticks(range(len(runs)), labels, fontsize="small" if len(runs) <= 20 else "x-small")
    ax.invert_yaxis()
    ax.set(xlabel="examples/sec (median over log windows)", title="training speed per run")
    ax.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=100)


def write_report(uri: str, folder: Path, experiment: str = "cifar_exp",
                 parent: str | None = None, progress: bool = True,
                 baseline: str | None = None) -> Report:
    """Read the runs from the store at `uri`, write report.md and the plots into `folder`,
    and log them to `parent` (when given) under report/, with the table as its note. With
    a `baseline` (`key=value ...`), compare the other configurations with it, in
    comparison.csv too, and log the differences as the parent's metrics."""
    check_tracking_uri(uri, must_exist=True)
    check_output_folder(folder)
    client = MlflowClient(uri)
    try:
        found = find_runs(client, experiment, parent)
    except MlflowException as error:  # e.g. a store of an older MLflow, never upgraded here
        raise ConfigError(f"cannot read the tracking store {redact(uri)} "
                          f"({one_line(error)})") from error
    if not found:
        raise ConfigError(f"no runs to report in {parent or experiment!r} at {redact(uri)}")
    runs = [summarize(client, run) for run in tqdm(found, desc="reading runs", unit="run",
                                                     disable=not progress or None)]
    keys = swept_keys(runs)
    # Before anything is written: a baseline naming no configuration is refused.
    found_comparisons = comparisons(runs, keys, baseline) if baseline else {}
    folder.mkdir(parents=True, exist_ok=True)
    finished = [run for run in runs if not math.isnan(run.precision)]
    whole = [run for run in finished if run.eval_images is None]
    best = min(whole or finished, key=_rank) if finished else None

    plots = [folder / "curves.png", folder / "speed.png"]
    plot_curves(runs, keys, plots[0])
    plot_speed(runs, keys, plots[1])
    if plot_params(runs, keys, folder / "params.png"):
        plots.append(folder / "params.png")

    title = f"sweep {parent}" if parent else f"experiment {experiment}"
    sections = [f"# Report: {title}", f"{len(runs)} runs, tracking store {uri}.",
                runs_table(runs, keys)]
    partial = sorted({run.eval_images for run in runs if run.eval_images is not None})
    if partial:
        sections.append(f"Runs scored on the first {', '.join(map(str, partial))} test images "
                        f"only (eval_images) show how many: their precision is not comparable "
                        f"with a whole-test-set run's, and they rank after those.")
    if best is not None:
        sections.append(f"Best: **{best.name}** ({_label(best, keys)}), precision "
                        f"{best.precision:.4f}" + (f" on the first {best.eval_images} test "
                                                   f"images" if best.eval_images else "") + ".")
    if (seeds := seed_table(runs, keys)) is not None:
        sections += ["## Over seeds", seeds]
    if baseline:
        sections += [f"## Against the baseline {baseline}", comparison_note(baseline),
                     comparison_table(found_comparisons)]
        write_comparison_csv(found_comparisons, folder / "comparison.csv")
    if (per_class := class_table(runs, keys)) is not None:
        sections += ["## Precision per class", CLASS_TABLE_NOTE, per_class]
    sections.append("\n".join(f"![{plot.stem}]({plot.name})" for plot in plots))
    # Masked whole: the store's URI and the runs' names and values are text of the user's.
    markdown = redact("\n\n".join(sections) + "\n")
    (folder / "report.md").write_text(markdown)

    if parent is not None:
        client.log_artifacts(parent, str(folder), "report")
        client.set_tag(parent, "mlflow.note.content", ui_note(markdown, plots, parent))
        if baseline:
            client.set_tag(parent, "baseline", baseline)
            for name, value in comparison_metrics(found_comparisons).items():
                client.log_metric(parent, name, value)
    return Report(folder, markdown, runs, keys, best, plots, found_comparisons)


def ui_note(markdown: str, plots: list[Path], parent: str) -> str:
    """The report as the note on the parent's page in the MLflow UI. The plots are the
    run's artifacts, as the UI serves them (report.md's relative links would not resolve
    there). The UI draws a note's tables with no padding and strips any style or
    attribute: non-breaking spaces keep the cells apart."""
    for plot in plots:
        markdown = markdown.replace(f"]({plot.name})", f"](get-artifact?path=report%2F"
                                                       f"{plot.name}&run_uuid={parent})")
    return "\n".join(_padded_cells(line) if line.startswith("| ") else line
                     for line in markdown.split("\n"))


def _padded_cells(row: str) -> str:
    """A table row as _row wrote it, NBSP_PADDING on either side of each cell (the row
    under the header, `| --- |`, as it is)."""
    if set(row) <= set("| -"):
        return row
    return _row([f"{NBSP_PADDING}{cell}{NBSP_PADDING}" for cell in row[2:-2].split(" | ")])


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


def argument_parser() -> argparse.ArgumentParser:
    """The command line of cifar-exp-report (python -m cifar_exp.report)."""
    parser = CommandParser(prog="python -m cifar_exp.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="cifar_exp", help="experiment name")
    parser.add_argument("--parent", help="a sweep's parent run id: report its jobs")
    parser.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                        help=f"the store (default {DEFAULT_TRACKING_URI})")
    parser.add_argument("--out", type=Path, help="folder (default reports/<parent or name>)")
    parser.add_argument("--baseline", metavar="KEY=VALUE",
                        help="the configuration to compare the others with, e.g. "
                             "optimizer=adam (several keys: quoted, space-separated)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = argument_parser().parse_args(argv)
        folder = args.out or default_folder(args.parent or args.experiment)
        report = write_report(args.tracking_uri, folder, args.experiment, args.parent,
                              baseline=args.baseline)
    except UserError as error:
        return refused(error)
    print(report.markdown)
    print(f"report written to {folder}/" + (" and logged to the parent run" if args.parent
                                              else ""))
    return 0

