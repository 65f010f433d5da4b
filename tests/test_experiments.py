"""The GPU benchmark script, smoke-tested on the CPU with tiny settings."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_bench_script_prints_its_table(tmp_path, data_root):
    env = {**os.environ, "CIFAR_EXP_DATA": str(data_root), "OUT": str(tmp_path / "out"),
           "STEPS": "20", "BENCH_ARGS": "--windows 1 --window-steps 2 --workers 0"}
    result = subprocess.run(["bash", str(REPO / "experiments" / "gpu_bench.sh"),
                             "tracking.log_model=false"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| cpu |")]
    assert [row.split("|")[4].strip() for row in rows] == ["128", "1024"]
    [summary] = [line for line in lines if line.startswith("optimizer=sgd_decay steps=20:")]
    assert "precision 0." in summary and " s end to end" in summary
    assert (tmp_path / "out" / "bench_1024.json").exists()
