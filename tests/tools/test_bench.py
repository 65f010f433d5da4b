"""The throughput comparison runs and reports consistent figures."""

from __future__ import annotations

import json

import pytest
import torch

from cifar_exp.tools import bench


def test_bench_reports_both_rates_and_their_ratio(tmp_path, data_root, capsys):
    out = tmp_path / "bench.json"
    bench.main([f"data.root={data_root}", "batch_size=32", "--windows", "2",
                "--window-steps", "3", "--workers", "0,1", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and figures["batch_size"] == 32
    assert figures["bare_examples_per_sec"] > 0 and figures["framework_examples_per_sec"] > 0
    ratio = figures["framework_examples_per_sec"] / figures["bare_examples_per_sec"]
    assert abs(figures["framework_over_bare"] - ratio) < 1e-12
    assert figures["untracked_examples_per_sec"] > 0 and figures["tracking_overhead"] < 1
    assert 0 < figures["logging_share"] < 1
    loader = figures["dataloader_examples_per_sec"]
    assert set(loader) == {"0", "1"} and min(loader.values()) > 0
    best = figures["dataloader_best_workers"]
    assert loader[str(best)] == max(loader.values())
    assert abs(figures["framework_over_dataloader"]
               - figures["framework_examples_per_sec"] / loader[str(best)]) < 1e-12
    printed = capsys.readouterr().out
    assert "(a) bare model step" in printed and "b/a = " in printed and "b/c = " in printed
    row = printed.strip().splitlines()[-1]
    assert row.startswith("| cpu |") and row.count("|") == bench.MARKDOWN_HEADER.count("|") // 2


def test_default_workers_start_at_zero():
    workers = bench.default_workers()
    assert workers[0] == 0 and workers == sorted(workers)


def test_framework_rates_without_tracking(cifar10):
    from cifar_exp.config import compose_config
    from cifar_exp.data import CifarData

    data = CifarData(cifar10.train_images[:256], cifar10.train_labels[:256],
                     cifar10.test_images[:100], cifar10.test_labels[:100], cifar10.classes)
    cfg = compose_config(["batch_size=32", "log_every=2"])
    timing = bench.framework_step_rates(cfg, data, windows=2, window_steps=4, store=None)
    assert len(timing.rates) == 4 and min(timing.rates) > 0  # steps 6-12 after 4 warm-up
    assert timing.logging_seconds == 0 and timing.train_seconds > 0


def test_bare_only_measures_the_step_alone(tmp_path, data_root, capsys):
    out = tmp_path / "bare.json"
    bench.main([f"data.root={data_root}", "batch_size=16", "amp=fp32",
                "channels_last=false", "--bare-only", "--windows", "1", "--window-steps", "2",
                "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["bare_examples_per_sec"] > 0 and "framework_examples_per_sec" not in figures
    assert figures["amp"] == "fp32" and figures["channels_last"] is False
    assert "(b)" not in capsys.readouterr().out


@pytest.mark.gpu
def test_bench_on_the_gpu_names_the_card(tmp_path, data_root):
    out = tmp_path / "bench.json"
    bench.main([f"data.root={data_root}", "batch_size=128", "--windows", "2",
                "--window-steps", "20", "--workers", "2", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["device"] == torch.cuda.get_device_name() and figures["amp"] == "bf16"
    assert figures["framework_examples_per_sec"] > 0
    assert figures["dataloader_examples_per_sec"]["2"] > 0


def test_profile_shows_what_the_framework_adds_to_the_bare_step(tmp_path, data_root, capsys):
    out, traces = tmp_path / "profile.json", tmp_path / "traces"
    bench.main([f"data.root={data_root}", "batch_size=16", "--window-steps", "2",
                "--profile", str(traces), "--json", str(out)])
    figures = json.loads(out.read_text())
    bare, framework = figures["bare"], figures["framework"]
    assert figures["profiled_steps"] == 2 and figures["model"] == "tf_cnn"
    # The same model step, plus sampling, augmentation and bookkeeping around it.
    assert framework["operators_per_step"] > bare["operators_per_step"] > 50
    assert bare["launches_per_step"] is None and framework["ms_per_step"] > 0
    assert {path.name for path in traces.iterdir()} == {"bare_step.json", "framework_step.json"}
    printed = capsys.readouterr().out
    assert "(b) framework step" in printed and "aten::convolution_backward" in printed
    assert "examples/sec" not in printed  # profiling replaces the rate measurement


def test_windows_of_no_steps_are_refused(data_root):
    with pytest.raises(SystemExit) as refused:
        bench.main([f"data.root={data_root}", "--window-steps", "0", "--bare-only"])
    assert refused.value.code == 2


@pytest.mark.gpu
def test_profile_on_the_gpu_counts_kernel_launches(tmp_path, data_root):
    figures = {}
    for setting in ("false", "true"):
        out = tmp_path / f"profile_{setting}.json"
        bench.main([f"data.root={data_root}", "batch_size=128", f"cuda_graph={setting}",
                    "--window-steps", "5", "--profile", str(tmp_path / setting),
                    "--json", str(out)])
        figures[setting] = json.loads(out.read_text())
    eager, graphed = figures["false"], figures["true"]
    assert (eager["cuda_graph"], graphed["cuda_graph"]) == (False, True)
    # Eager mode: at least one kernel for each convolution, forward and backward.
    assert eager["bare"]["launches_per_step"] >= 6
    assert eager["framework"]["launches_per_step"] > eager["bare"]["launches_per_step"]
    # Graphed: the whole bare step is one replay (the batch is copied in, not launched).
    assert 1 <= graphed["bare"]["launches_per_step"] <= 2
    assert graphed["framework"]["launches_per_step"] < eager["framework"]["launches_per_step"]
