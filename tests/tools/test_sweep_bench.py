"""The sweep benchmark: its command, its table and its refusals (the timing itself runs in
tests/test_experiments.py through experiments/packed_gpu.sh)."""

from __future__ import annotations

import sys

import pytest

from cifar_exp.tools import bench, sweep_bench
from cifar_exp.tools.sweep_bench import SweepTiming


def test_the_sweep_command_runs_n_seeds_under_each_launcher():
    command = sweep_bench.sweep_command(3, "stacked", ["steps=10"], "sqlite:///x.db")
    assert command[:4] == [sys.executable, "-m", "cifar_exp.run", "-m"]
    assert "seed=0,1,2" in command and "hydra/launcher=packed" in command
    assert "hydra.launcher.mode=stacked" in command and "steps=10" in command
    assert "hydra/launcher=packed" not in sweep_bench.sweep_command(3, "sequential", [], "u")


def test_the_table_gives_jobs_per_hour_against_the_first_way():
    table = sweep_bench.markdown_table([SweepTiming("sequential", 4, 400.0, [0.7, 0.72]),
                                        SweepTiming("stacked", 4, 100.0, [0.71, 0.73])])
    rows = table.splitlines()
    assert rows[2] == "| sequential | 4 | 400.0 | 36 | 1.00x | 0.7100 ± 0.0141 |"
    assert rows[3] == "| stacked | 4 | 100.0 | 144 | 4.00x | 0.7200 ± 0.0141 |"


@pytest.mark.parametrize(("args", "message"), [
    (["--sweep", "0"], "error: --sweep 0: give the number of jobs, at least 1"),
    (["--sweep", "2", "--modes", "sequential,threads"],
     "error: --modes threads: choose from sequential, stacked, processes, ray")])
def test_bad_sweep_arguments_are_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as ended:
        bench.main(args)
    assert ended.value.code == 2
    assert capsys.readouterr().err.strip() == message
