"""The report: tables, seed statistics and plots rendered from an MLflow store."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image

from cifar_exp.errors import ConfigError
from cifar_exp.tracking.class_results import ClassResults, write_table
from cifar_exp.tracking.report import (
    PAGE_INCHES,
    RunSummary,
    _label,
    class_table,
    comparisons,
    default_folder,
    main,
    parse_overrides,
    plot_curves,
    plot_params,
    plot_speed,
    runs_table,
    seed_table,
    swept_keys,
    write_report,
)
from tests.conftest import copy_store

PRECISIONS = {("adam", "0"): 0.61, ("adam", "1"): 0.63, ("sgd", "0"): 0.52, ("sgd", "1"): 0.56}
# Images of classes cat and dog each run got right, out of 10 of each; the last job is a
# run from before class results were logged.
RIGHT = {("adam", "0"): (6, 8), ("adam", "1"): (7, 9), ("sgd", "0"): (5, 10)}


def summary(name: str, precision: float, **overrides: str) -> RunSummary:
    return RunSummary(run_id=name, name=name, status="FINISHED", overrides=overrides,
                      precision=precision, examples_per_sec=1000.0, wall_seconds=12.0)


@pytest.fixture
def store(tmp_path: Path, store_template: Path) -> tuple[str, str]:
    """A store holding one sweep, parent and four jobs, as the sweep callback leaves it
    (written directly: no training needed). Returns (uri, parent run id)."""
    uri = copy_store(store_template, tmp_path)
    client = MlflowClient(uri)
    experiment = client.create_experiment("cifar_exp", (tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="sweep optimizer=adam,sgd seed=0,1",
                               tags={"sweep": "parent"}).info.run_id
    for number, ((optimizer, seed), precision) in enumerate(PRECISIONS.items()):
        run = client.create_run(experiment, run_name=f"tf_cnn-{optimizer}-10 #{number}", tags={
            "mlflow.parentRunId": parent, "overrides": f"optimizer={optimizer} seed={seed} "
                                                       "steps=10"}).info.run_id
        client.log_batch(run, metrics=[
            Metric("loss", 2.5 - step / 10, 0, step) for step in (5, 10)] + [
            Metric("examples_per_sec", 900.0 + step, 0, step) for step in (5, 10)] + [
            Metric("precision", precision, 0, 10)])
        if (optimizer, seed) in RIGHT:
            log_class_table(client, run, RIGHT[optimizer, seed], tmp_path / run)
        client.set_terminated(run)
    return uri, parent


def log_class_table(client: MlflowClient, run: str, right: tuple[int, int],
                    folder: Path) -> None:
    """The run's per_class.csv as a final evaluation logs it, of 10 cats and 10 dogs."""
    cats, dogs = right
    folder.mkdir()
    write_table(ClassResults(["cat", "dog"], np.array([[cats, 10 - cats], [10 - dogs, dogs]])),
                folder / "per_class.csv")
    client.log_artifact(run, str(folder / "per_class.csv"), "class_results")


def test_parse_overrides_drops_hydra_prefixes():
    assert parse_overrides("optimizer=sgd +experiment=x ~ema seed=1 lr=a=b") == {
        "optimizer": "sgd", "experiment": "x", "seed": "1", "lr": "a=b"}
    assert parse_overrides("") == {}


def test_swept_keys_are_the_overrides_that_differ():
    runs = [summary("a", 0.5, optimizer="sgd", steps="10", seed="0"),
            summary("b", 0.6, optimizer="adam", steps="10", seed="1"),
            summary("c", 0.7, optimizer="adam", steps="10")]
    assert swept_keys(runs) == ["optimizer", "seed"]


def test_runs_table_puts_the_best_first_and_shortens_numbers():
    runs = [summary("a", 0.5, **{"optimizer.lr": "0.0012345678"}),
            summary("b", 0.7, **{"optimizer.lr": "0.01"}),
            summary("c", math.nan, **{"optimizer.lr": "1e6"})]
    lines = runs_table(runs, ["optimizer.lr"]).splitlines()
    assert lines[0] == ("| run | optimizer.lr | status | precision | examples/sec "
                        "| wall time (s) |")
    assert lines[2] == "| b | 0.01 | FINISHED | 0.7000 | 1,000 | 12.0 |"
    assert lines[3].startswith("| a | 0.001235 |") and lines[4].startswith("| c | 1e+06 |")


def test_seed_table_gives_mean_and_sample_std_per_configuration():
    runs = [summary(f"{o}{s}", p, optimizer=o, seed=s) for (o, s), p in PRECISIONS.items()]
    table = seed_table(runs, ["optimizer", "seed"])
    adam = statistics.mean([0.61, 0.63]), statistics.stdev([0.61, 0.63])
    # The 95% interval: mean ± t(0.975, 1 df) * std / sqrt(2), t from a printed table.
    half = 12.7062 * 0.02 / 2
    assert (f"| adam | 2 | {adam[0]:.4f} ± {adam[1]:.4f} | [{0.62 - half:.4f}, "
            f"{0.62 + half:.4f}] | 1,000 |") in table
    assert "| sgd | 2 | 0.5400 ± 0.0283 | [0.2859, 0.7941] | 1,000 |" in table
    assert seed_table(runs, ["optimizer"]) is None  # no seed swept: no such table


def test_report_renders_a_sweep_from_the_store_and_logs_it_on_the_parent(store, tmp_path):
    uri, parent = store
    report = write_report(uri, tmp_path / "out", parent=parent, progress=False)
    assert report.swept == ["optimizer", "seed"]
    assert report.best.name == "tf_cnn-adam-10 #1" and report.best.precision == 0.63
    assert [run.examples_per_sec for run in report.runs] == [907.5] * 4  # median of windows
    assert {path.name for path in report.plots} == {"curves.png", "speed.png", "params.png"}
    for path in report.plots:
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown == report.markdown
    assert "| tf_cnn-adam-10 #1 | adam | 1 | FINISHED | 0.6300 |" in markdown
    assert "## Over seeds" in markdown and "![curves](curves.png)" in markdown
    # Per class: the mean over the seeds that logged class results (sgd's seed 1 did not).
    assert ("| class | optimizer=adam (2 runs) | optimizer=sgd (1 run) |\n| --- | --- | --- |\n"
            "| cat | **0.6500** | 0.5000 |\n| dog | 0.8500 | **1.0000** |") in markdown

    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert logged == {"report/report.md", "report/curves.png", "report/speed.png",
                      "report/params.png"}
    # On the parent's page the plots are its artifacts, as the MLflow UI serves them, and
    # the table cells are kept apart (the UI gives them no padding).
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    for plot in ("curves", "speed", "params"):
        assert f"![{plot}](get-artifact?path=report%2F{plot}.png&run_uuid={parent})" in note
    pad = "&nbsp;&nbsp;"
    assert (f"| {pad}tf_cnn-adam-10 #1{pad} | {pad}adam{pad} | {pad}1{pad} | "
            f"{pad}FINISHED{pad} |") in note
    assert f"| {pad}cat{pad} | {pad}**0.6500**{pad} | {pad}0.5000{pad} |" in note
    assert "| --- | --- | --- |" in note
    unpadded = note.replace(pad, "").replace("get-artifact?path=report%2F", "").replace(
        f"&run_uuid={parent}", "")
    assert unpadded == markdown  # nothing else differs


def summary_with_classes(name: str, precision: dict[str, float], **overrides: str
                         ) -> RunSummary:
    run = summary(name, 0.5, **overrides)
    run.class_precision = precision
    return run


def test_the_class_table_compares_configurations_over_seeds():
    runs = [summary_with_classes("a0", {"cat": 0.5, "dog": 0.9}, lr="0.1", seed="0"),
            summary_with_classes("a1", {"cat": 0.7, "dog": 0.8}, lr="0.1", seed="1"),
            summary_with_classes("b0", {"cat": 0.4, "dog": 0.9}, lr="0.01", seed="0"),
            summary_with_classes("old", {}, lr="0.01", seed="1"),  # logged none
            summary_with_classes("c0", {}, lr="1", seed="0")]  # no run of c logged any
    assert class_table(runs, ["lr", "seed"]).splitlines() == [
        "| class | lr=0.1 (2 runs) | lr=0.01 (1 run) |",
        "| --- | --- | --- |",
        "| cat | **0.6000** | 0.4000 |",
        "| dog | 0.8500 | **0.9000** |"]
    # One configuration: no bold, and its column says how many runs it averages.
    assert class_table(runs[:2], ["seed"]).splitlines()[2:] == ["| cat | 0.6000 |",
                                                                "| dog | 0.8500 |"]
    assert class_table(runs[:2], ["seed"]).splitlines()[0] == "| class | all runs (2 runs) |"
    # No run logged class results (all from before they were): no such table.
    assert class_table(runs[3:], ["lr", "seed"]) is None


def test_report_of_a_whole_experiment_leaves_sweep_parents_out(store, tmp_path):
    uri, _ = store
    report = write_report(uri, tmp_path / "out", experiment="cifar_exp", progress=False)
    assert sorted(run.name for run in report.runs) == [
        "tf_cnn-adam-10 #0", "tf_cnn-adam-10 #1", "tf_cnn-sgd-10 #2", "tf_cnn-sgd-10 #3"]


def test_cli_writes_the_folder(store, tmp_path, capsys):
    uri, parent = store
    assert main(["--parent", parent, "--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert "logged to the parent run" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--tracking-uri", "sqlite:///{tmp}/none.db"], "error: no tracking store at "),
    (["--experiment", "nope"], "error: no experiment 'nope' in the tracking store"),
    (["--parent", "0123abcd"], "error: no run 0123abcd in the tracking store"),
])
def test_cli_bad_input_is_one_line_and_exit_2(store, tmp_path, capsys, args, message):
    uri, _ = store
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    if "--tracking-uri" not in args:
        args += ["--tracking-uri", uri]
    assert main([*args, "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(message) and error.count("\n") == 1


def test_a_key_a_run_did_not_override_shows_its_value_from_the_config():
    runs = [summary("a", 0.5, **{"optimizer.lr": "0.01"}),
            summary("b", 0.6)]
    runs[1].params = {"optimizer.lr": "0.001", "optimizer.name": "adam"}
    runs[0].params = {"optimizer.lr": "0.01", "optimizer.name": "adam"}
    assert swept_keys(runs) == ["optimizer.lr"]
    table = runs_table(runs, ["optimizer.lr"])
    assert "| b | 0.001 |" in table and "| a | 0.01 |" in table and " - |" not in table


def test_top5_precision_follows_precision_where_runs_logged_it():
    runs = [summary("a", 0.5, seed="0"), summary("b", 0.7, seed="1"),
            summary("old", 0.6, seed="2")]  # from before top-5 was logged
    runs[0].precision_top5, runs[1].precision_top5 = 0.9, 0.95
    lines = runs_table(runs, []).splitlines()
    assert lines[0] == ("| run | status | precision | precision_top5 | examples/sec "
                        "| wall time (s) |")
    assert lines[2:] == ["| b | FINISHED | 0.7000 | 0.9500 | 1,000 | 12.0 |",
                         "| old | FINISHED | 0.6000 | - | 1,000 | 12.0 |",
                         "| a | FINISHED | 0.5000 | 0.9000 | 1,000 | 12.0 |"]
    over_seeds = seed_table(runs, ["seed"]).splitlines()
    assert over_seeds[0] == ("| seeds | precision (mean ± std) | precision 95% CI "
                             "| precision_top5 (mean ± std) | examples/sec (mean) |")
    top5 = statistics.mean([0.9, 0.95]), statistics.stdev([0.9, 0.95])
    assert over_seeds[2] == (f"| 3 | 0.6000 ± 0.1000 | [0.3516, 0.8484] | {top5[0]:.4f} ± "
                             f"{top5[1]:.4f} | 1,000 |")


def test_the_report_reads_top5_precision_from_the_store(store, tmp_path):
    uri, parent = store
    client = MlflowClient(uri)
    best = next(run for run in client.search_runs([client.get_run(parent).info.experiment_id])
                if run.info.run_name == "tf_cnn-adam-10 #1")
    client.log_metric(best.info.run_id, "precision_top5", 0.97, step=10)
    report = write_report(uri, tmp_path / "out", parent=parent, progress=False)
    assert report.best.precision_top5 == 0.97
    assert "| tf_cnn-adam-10 #1 | adam | 1 | FINISHED | 0.6300 | 0.9700 |" in report.markdown
    assert "| tf_cnn-sgd-10 #3 | sgd | 1 | FINISHED | 0.5600 | - |" in report.markdown


def test_runs_on_part_of_the_test_set_are_marked_and_ranked_after_whole_ones():
    whole, partial = summary("whole", 0.5), summary("partial", 0.9)
    partial.eval_images = 500
    lines = runs_table([partial, whole], []).splitlines()
    assert lines[2].startswith("| whole | FINISHED | 0.5000 |")
    assert lines[3].startswith("| partial | FINISHED | 0.9000 (500 images) |")


@pytest.mark.filterwarnings("error")  # matplotlib's warnings would reach the console
def test_plots_stay_readable_with_many_runs(tmp_path):
    runs = []
    for number in range(30):
        run = summary(f"tf_cnn-adam lr={number}", 0.5 + number / 100,
                      **{"optimizer.lr": f"{10 ** -(number % 5 + 1):g}",
                         "optimizer.weight_decay": str(number)})
        run.histories = {"loss": [(5, 2.0), (10, 1.5)], "precision": [(10, run.precision)]}
        runs.append(run)
    keys = swept_keys(runs)
    assert keys == ["optimizer.lr", "optimizer.weight_decay"]
    plot_curves(runs, keys, tmp_path / "curves.png")  # no legend: 30 runs
    plot_params(runs, keys, tmp_path / "params.png")
    plot_speed(runs, keys, tmp_path / "speed.png")
    for name in ("curves", "params", "speed"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
        with Image.open(tmp_path / f"{name}.png") as image:  # no wider than the UI's page
            assert image.width <= PAGE_INCHES * 100
    assert _label(runs[3], keys) == "lr=0.0001 weight_decay=3"


def test_a_legend_and_three_swept_keys_stay_within_the_page(tmp_path):
    runs = [summary(f"r{number}", 0.5 + number / 100, a=str(number), b=str(number % 2),
                    c=str(number % 3)) for number in range(6)]
    for run in runs:
        run.histories = {"loss": [(5, 2.0), (10, 1.5)], "precision": [(10, run.precision)]}
    plot_curves(runs, ["a", "b", "c"], tmp_path / "curves.png")  # with its legend
    plot_params(runs, ["a", "b", "c"], tmp_path / "params.png")  # two to a row
    for name in ("curves", "params"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.width <= PAGE_INCHES * 100


@pytest.mark.parametrize("name,folder", [
    ("cifar_exp", "cifar_exp"),
    ("../../escaped", "_.._escaped"),
    ("/etc", "_etc"),
    ("..", "_"),
])
def test_an_experiment_name_never_writes_outside_reports(name, folder):
    assert default_folder(name) == Path("reports") / folder


def test_a_baseline_compares_each_configuration_paired_by_seed(store, tmp_path):
    uri, parent = store
    report = write_report(uri, tmp_path / "out", parent=parent, progress=False,
                          baseline="optimizer=adam")
    # sgd - adam per seed: -0.09 and -0.07; mean -0.08, std 0.01414, t(0.975, 1) 12.7062.
    assert "## Against the baseline optimizer=adam" in report.markdown
    assert ("| optimizer=sgd | paired | 2 | -0.0800 | [-0.2071, 0.0471] | no difference "
            "shown at n=2 | 2 (paired) |") in report.markdown
    with (tmp_path / "out" / "comparison.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["configuration"], row["test"], row["verdict"]) for row in rows] == [
        ("optimizer=sgd", "paired", "no difference shown at n=2")]
    assert float(rows[0]["difference"]) == pytest.approx(-0.08)

    client = MlflowClient(uri)
    logged = client.get_run(parent).data
    assert logged.tags["baseline"] == "optimizer=adam"
    assert logged.metrics["vs_baseline/optimizer_sgd/difference"] == pytest.approx(-0.08)
    assert logged.metrics["vs_baseline/optimizer_sgd/ci_high"] == pytest.approx(0.0471,
                                                                                abs=1e-4)
    assert logged.metrics["vs_baseline/optimizer_sgd/seeds_needed"] == 2
    assert "report/comparison.csv" in {a.path for a in client.list_artifacts(parent,
                                                                              "report")}


def test_configurations_with_other_seeds_are_compared_by_welch():
    runs = [summary(f"{o}{s}", p, optimizer=o, lr=lr, seed=s) for o, lr, s, p in [
        ("adam", "0.010", "0", 0.60), ("adam", "0.010", "1", 0.62), ("adam", "0.010", "2", 0.61),
        ("sgd", "0.1", "0", 0.50), ("sgd", "0.1", "1", 0.52),
        ("sgd", "0.01", "0", 0.40)]]
    found = comparisons(runs, ["lr", "optimizer", "seed"], "optimizer=adam lr=0.01")
    assert found.keys() == {"lr=0.1 optimizer=sgd", "lr=0.01 optimizer=sgd"}
    welch = found["lr=0.1 optimizer=sgd"]
    assert welch.test == "Welch" and (welch.n, welch.n_baseline) == (2, 3)
    assert welch.difference == pytest.approx(0.51 - 0.61) and welch.verdict == "worse"
    assert found["lr=0.01 optimizer=sgd"] is None  # one run: nothing to compare


@pytest.mark.parametrize("baseline,message", [
    ("optimizer=adamx", "names 0 configurations, not one; name one of: optimizer=adam; "
                        "optimizer=sgd"),
    ("lr=0.1", "--baseline names lr, which the runs do not vary; they vary: optimizer"),
    ("adam", "give key=value"),
])
def test_a_baseline_that_names_no_single_configuration_is_refused(baseline, message):
    runs = [summary(f"{o}{s}", p, optimizer=o, seed=s) for (o, s), p in PRECISIONS.items()]
    with pytest.raises(ConfigError, match=message):
        comparisons(runs, ["optimizer", "seed"], baseline)


def test_cli_takes_a_baseline_and_refuses_a_bad_one_before_writing(store, tmp_path, capsys):
    uri, parent = store
    args = ["--parent", parent, "--tracking-uri", uri, "--out", str(tmp_path / "r")]
    assert main([*args, "--baseline", "optimizer=adamx"]) == 2
    # Its last line (MLflow's progress bar reading class results may come before it).
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: --baseline optimizer=adamx names 0 configurations")
    assert not (tmp_path / "r" / "report.md").exists()
    assert main([*args, "--baseline", "optimizer=adam"]) == 0
    assert "## Against the baseline optimizer=adam" in capsys.readouterr().out
