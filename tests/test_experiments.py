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
    assert result.returncode == 0
    assert all(flag in result.stdout for flag in ("--peers", "--runs", "--runs-of", "--dry-run"))


def test_race_refuses_a_missing_peer_file_in_one_line(tmp_path, capsys):
    race = load_race()
    assert race.main(["--peers", str(tmp_path / "nowhere"), "--contenders", "airbench94"]) == 2
    [error] = capsys.readouterr().err.splitlines()
    assert "nowhere/airbench94@01a2367.py" in error and "--export-from" in error


def test_race_runs_per_contender():
    race = load_race()
    args = race.parse_args(["--contenders", "fast94,airbench94,fast96",
                            "--runs-of", "airbench94=7"])
    assert args.runs_by_name == {"fast94": 25, "airbench94": 7, "fast96": race.SLOW_RUNS}
    assert race.runs_by_name(["fast96"], 3, []) == {"fast96": 3}
    for bad in (["--runs-of", "resnet=3"], ["--runs-of", "fast94=x"], ["--runs", "0"],
                ["--contenders", "resnet"]):
        with pytest.raises(SystemExit):
            race.parse_args(["--contenders", "fast94", *bad])


def test_race_interleaves_the_contenders_round_by_round():
    race = load_race()
    assert race.schedule(["a", "b", "c"], {"a": 3, "b": 3, "c": 1}) == [
        ["a", "b", "c"], ["b", "a"], ["a", "b"]]
    rounds = race.schedule(["a", "b", "c"], {"a": 4, "b": 4, "c": 4})
    assert [order[0] for order in rounds] == ["a", "b", "c", "a"]  # none always first
    assert all(sorted(order) == ["a", "b", "c"] for order in rounds)


# A stand-in for an airbench script: its table, one run per `main(run)`, and the line the
# race replaces; it notes every run it makes in order.txt, shared by the fakes.
FAKE_PEER = """\
import sys
name = sys.argv[0].removesuffix('.py')
print('|  run  |  epoch  |  tta_val_acc  |  time_seconds  |')
def main(run):
    with open('order.txt', 'a') as order:
        order.write(f'{name} {run}\\n')
    seconds = 9.0 if run == 'warmup' else 1.0 + int(run) / 10 + OFFSET
    print(f'|  {run}  |  0  |  |  {seconds}  |')
    print(f'|  |  eval  |  0.9{len(name)}  |  {seconds + 5}  |')
    return 0.9
accs = [main(run) for run in range(25)]
"""


def fake_peers(race, tmp_path, monkeypatch, offsets):
    """Fake peer files in tmp_path/peers, registered in race.PEERS; their patched scripts in
    tmp_path/work."""
    folder, work = tmp_path / "peers", tmp_path / "work"
    folder.mkdir()
    work.mkdir()
    contenders = []
    for name, offset in offsets.items():
        text = FAKE_PEER.replace("OFFSET", str(offset))
        peer = race.Peer(f"{name}.py", "abc1234", race.git_blob_id(text.encode()), "", "fp16",
                         False, "for run in range(25)")
        monkeypatch.setitem(race.PEERS, name, peer)
        (folder / peer.file).write_text(text)
        (work / f"{name}.py").write_text(race.check_peer(name, folder))
        contenders.append(race.Contender(name, [sys.executable, "-u", f"{name}.py"], work,
                                         race.PeerTable, True, 3, name))
    return folder, work, contenders


def test_race_patches_match_once_in_the_named_file(tmp_path, monkeypatch):
    race = load_race()
    folder, work, _ = fake_peers(race, tmp_path, monkeypatch, {"fake": 0})
    patched = (work / "fake.py").read_text()
    assert 'for run in iter(input, "stop")' in patched and "range(25)" not in patched
    path = folder / race.PEERS["fake"].file
    path.write_text(path.read_text() + "# edited\n")  # not the named revision's file
    with pytest.raises(race.RaceError, match="is not fake.py at abc1234"):
        race.check_peer("fake", folder)
    twice = FAKE_PEER + "for run in range(25): pass\n"
    monkeypatch.setitem(race.PEERS, "fake", race.Peer(
        "fake.py", "abc1234", race.git_blob_id(twice.encode()), "", "", False,
        "for run in range(25)"))
    path.write_text(twice)
    with pytest.raises(race.RaceError, match="found it 2 times"):
        race.check_peer("fake", folder)
    with pytest.raises(race.RaceError, match="missing .*--export-from"):
        race.check_peer("fake", tmp_path)


def test_race_runs_contenders_interleaved_in_their_own_processes(tmp_path, monkeypatch):
    race = load_race()
    _, work, contenders = fake_peers(race, tmp_path, monkeypatch, {"aa": 0, "bbb": 1})
    contenders[1].runs = 2
    logs = tmp_path / "logs"
    logs.mkdir()
    seen = []
    results, notes = race.race(contenders, logs, run_timeout=30, ready_timeout=30,
                               on_round=lambda results, rounds: seen.append(rounds))
    order = (work / "order.txt").read_text().split("\n")[:-1]
    assert order == ["aa warmup", "bbb warmup", "aa 0", "bbb 0", "bbb 1", "aa 1", "aa 2"]
    assert results["aa"].seconds == [1.0, 1.1, 1.2] and results["aa"].rounds == [0, 1, 2]
    assert results["bbb"].seconds == [2.0, 2.1] and results["bbb"].precision == [0.93, 0.93]
    assert seen == [0, 1, 2, 3] and notes == [] and (logs / "aa.log").is_file()
    # A budget stops before a round that would not fit; a dead contender is said so.
    contenders[0].command = [sys.executable, "-c", "print('boom')"]
    ticks = iter(range(0, 1000, 10))
    results, notes = race.race(contenders, logs, budget=25, run_timeout=30,
                               ready_timeout=30, clock=lambda: next(ticks))
    assert results["aa"].failed.startswith("warm-up: exited (0): boom")
    assert len(results["bbb"].seconds) == 1 and "stopped after 1 rounds" in notes[0]


def test_race_reads_a_peer_log_and_our_result_lines():
    race = load_race()
    seconds, precision = race.parse_peer_log(PEER_LOG)
    assert seconds == [2.5, 2.6] and precision == [0.94, 0.92]  # the warm-up run left out
    with pytest.raises(race.RaceError, match="no airbench results table"):
        race.parse_peer_log("Traceback ...")
    record = race.OurLines().feed(race.RESULT_PREFIX + json.dumps(
        {"run": "3", "seconds": 2.5, "precision": 0.94, "capture_seconds": 0.2}))
    assert (record.run, record.seconds, record.extra) == ("3", 2.5, {"capture_seconds": 0.2})
    assert race.OurLines().feed("step 10, loss = 1.0") is None


def test_race_table_gives_each_difference_with_its_interval():
    race = load_race()
    ours = race.Result("fast94", "cifar_exp experiment=fast94", "bf16 autocast", "",
                       [0, 1, 2], [2.0, 2.1, 2.2], [0.90, 0.91, 0.92],
                       [{"capture_seconds": 0.1}] * 3)
    peer = race.Result("airbench94", "airbench94.py @ 01a2367", "fp16", "3.83 s",
                       [0, 1, 2], [3.0, 3.1, 3.3], [0.91, 0.91, 0.91])
    failed = race.Result("airbench94_compiled", "legacy/airbench94_compiled.py @ 1b8f794",
                         failed="warm-up: no result within 150 s")
    lines = race.format_table([ours, peer, failed], "NVIDIA H100", ["Rounds done: 3."])
    lines = lines.splitlines()
    assert "the final TTA evaluation too" in lines[0] and "fresh process" in lines[0]
    assert lines[4].endswith("| 3 | 2.100 ± 0.100 | 0.100 ± 0.000 | 0.9100 ± 0.0100 |")
    assert "(in their warm-up)" in lines[5]
    assert "| 0 | failed (warm-up: no result within 150 s) |" in lines[6]
    # paired by round: differences -1.0, -1.0, -1.1; t(2) = 4.303
    [time_row] = [line for line in lines if line.startswith("| fast94 | airbench94.py")]
    assert "-1.033 [-1.177, -0.890] (paired, n=3)" in time_row
    assert "+0.0000 [-0.0248, +0.0248] (paired, n=3)" in time_row
    assert any("legacy/airbench94_compiled.py" in line and "n/a (fewer than 2 runs)" in line
               for line in lines)
    assert lines[-1] == "Rounds done: 3."


@pytest.mark.slow  # two short fast94 runs on the CPU, in the worker's own process
def test_race_worker_answers_one_run_per_request(data_root):
    result = subprocess.run(
        [sys.executable, str(RACE), "--worker", "fast94", "--device", "cpu",
         "--data", str(data_root), "--override=steps=2", "--override=batch_size=64",
         "--override=eval_images=200", "--override=tta=none"],
        input="warmup\n0\nstop\n", capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    race = load_race()
    records = [r for line in result.stdout.splitlines() if (r := race.OurLines().feed(line))]
    assert [r.run for r in records] == ["warmup", "0"]
    assert all(r.seconds >= r.extra["train_seconds"] > 0 for r in records)
    assert records[1].extra["captures"] == 0 and records[1].extra["amp"] == "fp32"


# --- experiments/gpu_check.sh: the one GPU call, its dry run on the CPU ---

GPU_CHECK = REPO / "experiments" / "gpu_check.sh"


def test_gpu_check_dry_run_passes_on_the_cpu(data_root):
    race = load_race()
    peers = all((REPO / "peers" / peer.file).is_file() for peer in race.PEERS.values())
    env = {**os.environ, "CIFAR_EXP_DATA": str(data_root), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(GPU_CHECK), "--dry-run",
                             *([] if peers else ["--no-peers"])],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "dry run: ok"
    for part, budget in (("1_gpu_tests", 60), ("2_bench", 80), ("3_race", 270),
                         ("4_packed", 60), ("5_sgd_100k", 170)):
        assert f"{part}: " in result.stdout and f"budget {budget} s" in result.stdout
    assert "python -m pytest -m gpu" in result.stdout.replace(sys.executable, "python")
    assert "packed and unpacked byte for byte" in result.stdout


def load_gpu_check(monkeypatch):  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "experiments" /
                                                  "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # for its dataclasses
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_gpu_check_budgets_fit_its_eight_minutes(tmp_path, monkeypatch):
    gpu_check = load_gpu_check(monkeypatch)
    args = gpu_check.argument_parser().parse_args(["--dry-run"])
    planned = [part for part in gpu_check.parts(args, tmp_path) if not part.minimum]
    assert gpu_check.TOTAL_SECONDS < 8 * 60
    assert sum(part.budget for part in planned) <= gpu_check.TOTAL_SECONDS


def test_gpu_check_keeps_each_parts_table_when_a_later_part_runs_out(tmp_path, monkeypatch):
    gpu_check = load_gpu_check(monkeypatch)
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    done = gpu_check.Part("1_quick", "a quick part", 20, [["true"]], lambda _: "| it ran |")
    slow = gpu_check.Part("2_slow", "a part past its budget", 6, [["sleep", "60"]],
                          lambda _: "| partial |")
    never = gpu_check.Part("3_late", "a part with no time left", 30, [["true"]],
                           lambda _: "", minimum=1000)
    monkeypatch.setattr(gpu_check, "parts", lambda args, folder: [done, slow, never])
    args = gpu_check.argument_parser().parse_args(["--total", "60"])
    assert gpu_check.run_all(args, out, work) == 0
    assert "done" in (out / "1_quick.md").read_text()
    assert "| it ran |" in (out / "1_quick.md").read_text()
    assert "out of time" in (out / "2_slow.md").read_text()
    assert not (out / "3_late.md").exists()
    summary = (out / "summary.md").read_text()
    assert "| 1_quick: a quick part | 20 | done" in summary and "3_late" in summary
    assert "skipped" in summary.split("3_late")[1]


def test_gpu_check_dry_run_says_what_would_fail(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setenv("CIFAR_EXP_DATA", str(data_root))
    gpu_check = load_gpu_check(monkeypatch)
    args = gpu_check.argument_parser().parse_args(["--dry-run", "--peers", str(tmp_path)])
    problems, plan = gpu_check.check_race(args)
    assert len(problems) == 3 and all("missing" in p for p in problems)
    assert plan[0].startswith("fast94: cifar_exp experiment=fast94")
    args = gpu_check.argument_parser().parse_args(["--dry-run", "--data", str(tmp_path),
                                                   "--packed", str(tmp_path / "none")])
    [problem] = gpu_check.check_files(args)
    assert "lacks data_batch_1.bin" in problem


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
