"""The throughput comparison runs and reports consistent figures."""

from __future__ import annotations

import json

from cifar_exp import bench


def test_bench_reports_both_rates_and_their_ratio(tmp_path, data_root, capsys):
    out = tmp_path / "bench.json"
    bench.main([f"data.root={data_root}", "batch_size=32", "--windows", "2",
                "--window-steps", "3", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and figures["batch_size"] == 32
    assert figures["bare_examples_per_sec"] > 0 and figures["framework_examples_per_sec"] > 0
    ratio = figures["framework_examples_per_sec"] / figures["bare_examples_per_sec"]
    assert abs(figures["framework_over_bare"] - ratio) < 1e-12
    assert figures["untracked_examples_per_sec"] > 0 and figures["tracking_overhead"] < 1
    assert 0 < figures["logging_share"] < 1
    printed = capsys.readouterr().out
    assert "(a) bare model step" in printed and "b/a = " in printed


def test_framework_rates_without_tracking(cifar10):
    from cifar_exp.config import compose_config
    from cifar_exp.data import CifarData

    data = CifarData(cifar10.train_images[:256], cifar10.train_labels[:256],
                     cifar10.test_images[:100], cifar10.test_labels[:100], cifar10.classes)
    cfg = compose_config(["batch_size=32", "log_every=2"])
    timing = bench.framework_step_rates(cfg, data, windows=2, window_steps=4, tracking=False)
    assert len(timing.rates) == 4 and min(timing.rates) > 0  # steps 6-12 after 4 warm-up
    assert timing.logging_seconds == 0 and timing.train_seconds > 0
