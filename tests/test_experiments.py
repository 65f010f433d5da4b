"""The GPU scripts (benchmark, fast recipes), smoke-tested on the CPU with tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_exp.tools import bench

REPO = Path(__file__).resolve().parent.parent


def test_gpu_bench_script_prints_its_table(tmp_path, data_root):
    env = {**os.environ, "PYTHON": sys.executable, "CIFAR_EXP_DATA": str(data_root),
           "OUT": str(tmp_path / "out"),
           "STEPS": "20", "BATCHES": "16 32",
           "BENCH_ARGS": "--windows 1 --window-steps 2 --workers 0", "SGD_ARGS": "",
           "PROFILES": "compile=none", "PROFILE_STEPS": "2"}
    result = subprocess.run(["bash", str(REPO / "experiments" / "gpu_bench.sh"),
                             "eval_images=500", "tracking.log_model=false"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = bench.MARKDOWN_HEADER.splitlines()[0]
    table = lines[max(i for i, line in enumerate(lines) if line == header) :]  # the last one
    rows = [line for line in table if line.startswith("| cpu |")]
    assert [row.split("|")[4].strip() for row in rows] == ["16", "32"]
    [summary] = [line for line in lines if line.startswith("optimizer=sgd_decay steps=20:")]
    assert "precision 0." in summary and " s end to end" in summary
    assert (tmp_path / "out" / "bench_32.json").exists()
    profile = json.loads((tmp_path / "out" / "profile_compile_none.json").read_text())
    assert profile["batch_size"] == 16 and profile["compile"] == "none"
    assert profile["framework"]["operators_per_step"] > profile["bare"]["operators_per_step"]
    assert "(b) framework step" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # writes nowhere else


@pytest.mark.slow
def test_fast_gpu_script_prints_its_table(tmp_path, data_root):
    env = {**os.environ, "PYTHON": sys.executable, "CIFAR_EXP_DATA": str(data_root),
           "OUT": str(tmp_path / "out"), "SEEDS": "0 1", "OTHERS": "tf_tutorial_adam",
           "OTHER_SEEDS": "0 1"}
    result = subprocess.run(["bash", str(REPO / "experiments" / "fast_gpu.sh"), "steps=2",
                             "batch_size=64", "tta=none", "eval_images=500",
                             "tracking.log_model=false"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| fast94 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["0", "1"]
    assert all(0 <= float(row.split("|")[3]) <= 1 for row in rows)
    assert "fast94 over 2 seeds: " in result.stdout
    others = [line for line in result.stdout.splitlines()
              if line.startswith("| tf_tutorial_adam |")]
    assert [row.split("|")[2].strip() for row in others] == ["0", "1"]
    assert "tf_tutorial_adam over 2 seeds: " in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # writes nowhere else
