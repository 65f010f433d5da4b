"""The GPU scripts (benchmark, fast recipes), smoke-tested on the CPU with tiny settings."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_exp.tools import bench

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # five commands, each a fresh interpreter: two benches, a run, a profile
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


# --- experiments/race.py: its CPU parts (the race itself needs a GPU and airbench's code) ---

RACE = REPO / "experiments" / "race.py"
# A peer's table as airbench prints it: the run named on its first row, an `eval` row last.
PEER_LOG = """\
------------------------------------------------------------------------------
|  run     |  epoch  |  train_acc  |  val_acc  |  tta_val_acc  |  time_seconds  |
------------------------------------------------------------------------------
|  warmup  |      0  |     0.1000  |   0.1000  |               |        9.0000  |
|          |   eval  |             |           |       0.1000  |       20.0000  |
|       0  |      0  |     0.8000  |   0.8000  |               |        1.0000  |
|          |      1  |     0.9000  |   0.9300  |               |        2.5000  |
|          |   eval  |             |           |       0.9400  |        2.7000  |
|       1  |      0  |     0.8000  |   0.8000  |               |        1.1000  |
|          |      1  |     0.9000  |   0.9300  |               |        2.6000  |
|          |   eval  |             |           |       0.9200  |        2.8000  |
Mean: 0.9300    Std: 0.0141
"""


def load_race():
    spec = importlib.util.spec_from_file_location("race", RACE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["race"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_race_help_runs_on_the_cpu():
    result = subprocess.run([sys.executable, str(RACE), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--peers" in result.stdout and "--seeds" in result.stdout


def test_race_refuses_a_missing_peers_folder_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(RACE), "--peers", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "nowhere: no such folder" in error and "airbench94_muon.py" in error


def test_race_arguments_and_peer_files(tmp_path):
    race = load_race()
    (tmp_path / "airbench94_muon.py").write_text("")
    args = race.parse_args(["--peers", str(tmp_path), "--contenders",
                            "airbench94_muon,fast94_muon"])
    assert args.seeds == 5 and args.contenders == ["airbench94_muon", "fast94_muon"]
    assert args.peer_files == {"airbench94_muon": tmp_path / "airbench94_muon.py"}
    with pytest.raises(race.RaceError, match=r"missing peer script\(s\) .*airbench94.py"):
        race.peer_files(tmp_path, race.CONTENDERS)
    assert race.peer_files(tmp_path / "absent", ["fast94"]) == {}  # ours need no peers
    with pytest.raises(SystemExit):
        race.parse_args(["--peers", str(tmp_path), "--contenders", "resnet"])


def test_race_patches_the_peer_scripts_as_documented():
    race = load_race()
    legacy = "    #main('warmup')\n    accs = torch.tensor([main(run) for run in range(25)])\n"
    assert race.patched(legacy, "airbench94", 5) == (
        "    main('warmup')\n    accs = torch.tensor([main(run) for run in range(5)])\n")
    muon = "accs = torch.tensor([main(run, model) for run in range(200)])"
    assert "for run in range(3)" in race.patched(muon, "airbench94_muon", 3)
    with pytest.raises(race.RaceError, match="expected 'for run in range.200.' once"):
        race.patched("print('a modified file')", "airbench94_muon", 5)


def test_race_reads_a_peer_log_and_prints_its_table():
    race = load_race()
    seconds, precision = race.parse_peer_log(PEER_LOG)
    assert seconds == [2.5, 2.6] and precision == [0.94, 0.92]  # the warm-up run left out
    with pytest.raises(race.RaceError, match="no airbench results table"):
        race.parse_peer_log("Traceback ...")
    results = [race.Result("airbench94_muon", "airbench94_muon.py, published", seconds,
                           precision), race.Result("fast94_muon", "cifar_exp")]
    table = race.format_table(results, "NVIDIA H200").splitlines()
    assert "CIFAR-10 (JPEG copy)" in table[2]
    assert table[4] == ("| airbench94_muon | airbench94_muon.py, published | 2 | "
                        "2.55 ± 0.07 | 0.9300 ± 0.0141 |")
    assert table[5] == "| fast94_muon | cifar_exp | 0 | failed | failed |"
    assert race.mean_std([1.0]) == (1.0, 0.0)


@pytest.mark.slow  # three short sweeps of two jobs, twice
def test_packed_gpu_script_prints_both_tables(tmp_path, data_root):
    env = {**os.environ, "PYTHON": sys.executable, "CIFAR_EXP_DATA": str(data_root),
           "OUT": str(tmp_path / "out"), "JOBS": "2", "BASELINE_ARGS": "",
           "FAST_ARGS": "batch_size=64 eval_batch_size=250", "MPS": "false"}
    result = subprocess.run(["bash", str(REPO / "experiments" / "packed_gpu.sh"), "steps=2",
                             "log_every=1", "eval_images=100"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    for table in ("baseline.md", "fast94.md"):
        rows = (tmp_path / "out" / table).read_text().splitlines()[2:]
        assert [row.split("|")[1].strip() for row in rows] == ["sequential", "stacked",
                                                               "processes", "ray"]
        assert all(row.split("|")[2].strip() == "2" for row in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # writes nowhere else


# --- experiments/carry_data.py: the data set packed small, unpacked byte for byte ---

CARRY = REPO / "experiments" / "carry_data.py"


def test_carry_data_packs_small_and_unpacks_the_same_bytes(tmp_path, data_root):
    source = tmp_path / "source"
    source.mkdir()
    real = data_root / "cifar-10-batches-bin"
    (source / "test_batch.bin").write_bytes((real / "test_batch.bin").read_bytes()[:500 * 3073])
    (source / "batches.meta.txt").write_bytes((real / "batches.meta.txt").read_bytes())
    packed, rebuilt = tmp_path / "packed", tmp_path / "rebuilt"
    for action, origin, destination in (("pack", source, packed),
                                        ("unpack", packed, rebuilt)):
        result = subprocess.run([sys.executable, str(CARRY), action, str(origin),
                                 str(destination)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    for name in ("test_batch.bin", "batches.meta.txt"):
        assert (rebuilt / name).read_bytes() == (source / name).read_bytes()
    packed_size = sum(path.stat().st_size for path in packed.iterdir())
    assert packed_size < 0.4 * (source / "test_batch.bin").stat().st_size

    manifest = json.loads((packed / "manifest.json").read_text())
    manifest["files"]["test_batch.bin"]["sha256"] = "0" * 64  # as if decoded otherwise
    (packed / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, str(CARRY), "unpack", str(packed),
                             str(tmp_path / "again")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: test_batch.bin: rebuilt bytes differ")
    assert f"install Pillow=={manifest['pillow']}" in result.stderr
