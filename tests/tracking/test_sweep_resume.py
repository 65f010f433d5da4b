"""Durable grid sweeps: the same sweep command, run again in its folder with resume=auto,
goes on as one sweep (tracking/sweep_record.py, tracking/sweep_resume.py,
job/sweep_job.py): finished jobs skipped, a killed job continued from its checkpoint, the
jobs never started run, one MLflow parent; a grown grid keeps its old jobs, a changed one is
refused, and so is a second command on the same sweep."""

from __future__ import annotations

import logging
import math
import random
import re
import shlex
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from cifar_exp.config import compose_config
from cifar_exp.job.job import JobContext
from cifar_exp.job.sweep_job import follow_log_files, run_in_sweep
from cifar_exp.tracking import sweep_record
from cifar_exp.tracking.sweep_record import (
    FAILED,
    FINISHED,
    SweepRecord,
    read_record,
    sweep_lock,
    write_record,
)
from tests.conftest import cli, copy_store, data_env, stop_process_group, warm_python

# Tiny jobs: 4 steps of 8 images, a checkpoint every 2 steps, every point written at once.
JOB = ("steps=4", "log_every=2", "eval_every=4", "eval_images=100", "batch_size=8",
       "checkpoint.every=2", "tracking.log_model=false", "tracking.system_metrics_seconds=0",
       "tracking.flush_seconds=0")
STEPS = {"loss": [2, 4], "lr": [2, 4], "examples_per_sec": [2, 4], "sec_per_batch": [2, 4],
         "precision": [4], "test_loss": [4]}
DETERMINISTIC = ("loss", "lr", "precision", "test_loss")  # not the timings
# Where the sweep is killed: the first line of its second job's log that says this. The
# seed picks one for the default suite; the slow test tries each.
KILL_POINTS = ("MLflow run ", "step 2, loss = ", "step 2, checkpoint saved",
               "step 4, loss = ")
KILL_SEED = 0
# The sweep command in a session of its own, so that the whole process group can be
# killed, as a scheduler or an out-of-memory killer would; run by the warm interpreter.
OWN_GROUP = ("import os, runpy\nos.setsid()\n"
             "runpy.run_module('cifar_exp.run', run_name='__main__', alter_sys=True)\n")


def start_in_own_group(folder: Path, *args: str, data_root: Path, output: Path):
    (folder / "own_group.py").write_text(OWN_GROUP)
    output.write_bytes(b"")
    return warm_python().start("own_group", list(args), folder, data_env(data_root), output,
                               output)


def wait_for(condition: Callable[[], bool], process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the sweep ended (exit code {process.returncode}) too early")
        if time.monotonic() > deadline:
            stop_process_group(process, signal.SIGKILL)
            pytest.fail("the kill point was not reached in time")
        time.sleep(0.05)


def statuses(sweep_dir: Path) -> dict[str, str]:
    record = read_record(sweep_dir / sweep_record.FILENAME)
    return {name: job.status for name, job in record.jobs.items()} if record else {}


def log_says(path: Path, text: str) -> bool:
    return path.is_file() and text in path.read_text()


def sweep_runs(uri: str) -> tuple[list, list]:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cifar_exp").experiment_id])
    parents = [run for run in runs if run.data.tags.get("sweep") == "parent"]
    return parents, [run for run in runs if run not in parents]


def histories(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(uri)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in STEPS}


def one_finished_run_per_job(uri: str, names: set[str]) -> tuple:
    """(parent, {name: finished child}) of the one sweep in the store, checked: every job
    FINISHED exactly once under it (a run killed before its first checkpoint is left
    KILLED beside), each metric with each step once."""
    [parent], children = sweep_runs(uri)
    assert parent.info.status == "FINISHED"
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    finished = [run for run in children if run.info.status == "FINISHED"]
    assert sorted(run.info.run_name for run in finished) == sorted(names)
    assert {run.info.status for run in children if run not in finished} <= {"KILLED"}
    for run in finished:
        for key, points in histories(uri, run.info.run_id).items():
            assert [step for step, _ in points] == STEPS[key], (run.info.run_name, key)
    return parent, {run.info.run_name: run for run in finished}


def kill_and_resume(tmp_path: Path, data_root: Path, store: str, kill_point: str,
                    launcher: tuple[str, ...] = (), all_at_once: bool = False) -> None:
    """A sweep of three seeds, its process group killed once its first job finished and
    its second reached `kill_point`, then the same command with resume=auto. A launcher
    that runs `all_at_once` (submitit's local executor) is killed at the second job's
    `kill_point` alone, and its resumed sweep run once more: every job finished, none
    trained again."""
    sweep_dir = tmp_path / "sweep"
    command = ("-m", *launcher, "seed=0,1,2", *JOB, f"tracking.uri={store}",
               f"hydra.sweep.dir={sweep_dir}")
    process = start_in_own_group(tmp_path, *command, data_root=data_root,
                                 output=tmp_path / "killed.txt")
    wait_for(lambda: (all_at_once or statuses(sweep_dir).get("0") == FINISHED)
             and log_says(sweep_dir / "1" / "run.log", kill_point), process)
    stop_process_group(process, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert all_at_once or statuses(sweep_dir)["0"] == FINISHED
    assert "1" in statuses(sweep_dir)

    resumed = cli(tmp_path, *command, "resume=auto", data_root=data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert statuses(sweep_dir) == {"0": FINISHED, "1": FINISHED, "2": FINISHED}
    skipped = ["0"]
    if all_at_once:
        resumed = cli(tmp_path, *command, "resume=auto", data_root=data_root)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        skipped = ["0", "1", "2"]
    output = resumed.stdout + resumed.stderr
    for job in skipped:
        # submitit's jobs log to their files only, not to the command's output.
        logged = output + (sweep_dir / job / "run.log").read_text()
        assert re.search(rf"tf_cnn-adam seed={job} finished in an earlier run of this sweep, "
                         rf"in {sweep_dir / job}: not trained again", logged)
        assert f"(tf_cnn-adam seed={job})" not in output  # no new MLflow run for it


def check_the_resumed_sweep(tmp_path: Path, data_root: Path, store: str,
                            store_template: Path, launcher: tuple[str, ...] = (),
                            commands: int = 2) -> None:
    """One parent, each job FINISHED once with each point once, the record's results the
    runs', and the killed job's metrics those of the same job uninterrupted: alone, or a
    sweep of it alone on the same `launcher` where that launcher trains it another way
    (packed: stacked). The sweep's command ran `commands` times."""
    names = {"tf_cnn-adam seed=0", "tf_cnn-adam seed=1", "tf_cnn-adam seed=2"}
    parent, finished = one_finished_run_per_job(store, names)
    assert parent.data.metrics["jobs_finished"] == 3
    record = read_record(tmp_path / "sweep" / sweep_record.FILENAME)
    assert record.parent_run_id == parent.info.run_id and record.runs == commands
    for name, job in record.jobs.items():  # the results the sweeper got, skipped or not
        assert job.precision == finished[f"tf_cnn-adam seed={name}"].data.metrics["precision"]
    # The killed job learned what it learns uninterrupted: the same run, alone.
    reference_store = copy_store(store_template, tmp_path / "reference")
    where = (("-m", *launcher, f"hydra.sweep.dir={tmp_path / 'reference' / 'sweep'}")
             if launcher else (f"hydra.run.dir={tmp_path / 'reference' / 'run'}",))
    alone = cli(tmp_path, *where, "seed=1", *JOB, f"tracking.uri={reference_store}",
                data_root=data_root)
    assert alone.returncode == 0, alone.stderr[-3000:]
    [reference] = sweep_runs(reference_store)[1]
    expected = histories(reference_store, reference.info.run_id)
    got = histories(store, finished["tf_cnn-adam seed=1"].info.run_id)
    assert {key: got[key] for key in DETERMINISTIC} == {key: expected[key]
                                                        for key in DETERMINISTIC}


def test_a_killed_sweep_resumes_as_one_sweep(tmp_path, data_root, store, store_template):
    kill_point = random.Random(KILL_SEED).choice(KILL_POINTS)
    kill_and_resume(tmp_path, data_root, store, kill_point)
    check_the_resumed_sweep(tmp_path, data_root, store, store_template)


@pytest.mark.slow  # each kill point: a sweep killed and resumed, and a reference run
@pytest.mark.parametrize("kill_point", KILL_POINTS)
@pytest.mark.parametrize("launcher", [(), ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")],
                         ids=["basic", "joblib"])
def test_a_sweep_killed_anywhere_resumes_as_one_sweep(tmp_path, data_root, store,
                                                      store_template, kill_point, launcher):
    kill_and_resume(tmp_path, data_root, store, kill_point, launcher)
    check_the_resumed_sweep(tmp_path, data_root, store, store_template)


# One pack per job: the first finishes while the second trains, as on the other launchers.
PACKED_STACKED = ("hydra/launcher=packed", "hydra.launcher.mode=stacked",
                  "hydra.launcher.jobs_per_device=1")


@pytest.mark.slow  # a sweep killed and resumed on another launcher, and a reference run
@pytest.mark.parametrize(("launcher", "kill_point"), [
    (("hydra/launcher=submitit_local",), "step 2, checkpoint saved"),
    (("hydra/launcher=ray",), "step 2, loss = "),
    (PACKED_STACKED, "step 2, checkpoint saved"),
    (PACKED_STACKED, "step 4, loss = "),
], ids=["submitit", "ray", "packed-checkpointed", "packed-last-step"])
def test_a_sweep_on_another_launcher_killed_resumes_as_one_sweep(
        tmp_path, data_root, store, store_template, launcher, kill_point):
    # submitit's local executor starts every job at once.
    all_at_once = launcher[0] == "hydra/launcher=submitit_local"
    kill_and_resume(tmp_path, data_root, store, kill_point, launcher, all_at_once)
    reference = launcher if launcher == PACKED_STACKED else ()
    check_the_resumed_sweep(tmp_path, data_root, store, store_template, reference,
                            commands=3 if all_at_once else 2)


@pytest.mark.slow  # a sweep stopped, then the command it prints, and a reference run
def test_a_stopped_sweep_says_how_to_go_on_and_that_command_finishes_it(
        tmp_path, data_root, store, store_template):
    sweep_dir = tmp_path / "sweep"
    output = tmp_path / "stopped.txt"
    process = start_in_own_group(tmp_path, "-m", "seed=0,1,2", *JOB, f"tracking.uri={store}",
                                 f"hydra.sweep.dir={sweep_dir}", data_root=data_root,
                                 output=output)
    wait_for(lambda: log_says(sweep_dir / "1" / "run.log", "step 2, checkpoint saved"),
             process)
    stop_process_group(process, signal.SIGTERM)
    assert process.returncode == 143
    last = output.read_text().strip().splitlines()[-1]
    said = re.fullmatch(r"the sweep goes on with: python -m cifar_exp.run (.*)", last)
    assert said and said[1].endswith(f"hydra.sweep.dir={sweep_dir} resume=auto"), last
    assert sweep_runs(store)[0][0].info.status == "FAILED"

    resumed = cli(tmp_path, *shlex.split(said[1]), data_root=data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_the_resumed_sweep(tmp_path, data_root, store, store_template)


def test_a_grown_grid_keeps_its_old_jobs(tmp_path, data_root, store):
    sweep_dir = tmp_path / "sweep"
    where = (*JOB, f"tracking.uri={store}", f"hydra.sweep.dir={sweep_dir}")
    first = cli(tmp_path, "-m", "seed=0", *where, data_root=data_root)
    assert first.returncode == 0, first.stderr[-3000:]

    # optimizer.lr newly swept: its old job ran at the default, 0.001, now job 1. Job 0 is
    # new and finds Hydra's folder 0 taken: it gets one of its own.
    grown = cli(tmp_path, "-m", "optimizer.lr=0.002,0.001", "seed=0", *where, "resume=auto",
                data_root=data_root)
    assert grown.returncode == 0, grown.stderr[-3000:]
    [new] = [name for name in statuses(sweep_dir) if name != "0"]
    assert re.fullmatch(r"0_[0-9a-f]{8}", new)
    assert statuses(sweep_dir) == {"0": FINISHED, new: FINISHED}
    assert not (sweep_dir / "1").exists()  # Hydra's folder for job 1, which needed none
    assert "lr=0.002" not in (sweep_dir / "0" / "run.log").read_text()
    assert "finished in an earlier run" in (sweep_dir / "0" / "run.log").read_text()
    assert "step 4, precision" in (sweep_dir / new / "run.log").read_text()
    # Named by what each run of the sweep varied: nothing at first (by number), then lr.
    parent, _ = one_finished_run_per_job(store, {"tf_cnn-adam-4 #0", "tf_cnn-adam lr=0.002"})
    assert parent.data.metrics["jobs"] == 2


def test_a_changed_sweep_or_a_second_command_is_refused_before_it_starts(tmp_path, data_root,
                                                                         store):
    # A sweep recorded as finished, with steps=4 among its fixed values: no need to train it.
    client = MlflowClient(store)
    experiment = client.create_experiment("cifar_exp")
    parent = client.create_run(experiment, tags={"sweep": "parent"}).info.run_id
    client.set_terminated(parent)
    sweep_dir = tmp_path / "sweep"
    write_record(sweep_dir / sweep_record.FILENAME,
                 SweepRecord(parent_run_id=parent, runs=1, fixed={"steps": 4}))
    where = (*JOB, f"tracking.uri={store}", f"hydra.sweep.dir={sweep_dir}")

    changed = cli(tmp_path, "-m", "seed=0,1", *where, "steps=5", "resume=auto",
                  data_root=data_root)
    assert changed.returncode == 2
    assert changed.stderr.strip() == (
        f"error: {sweep_dir} holds a sweep of other fixed values (steps=4 there, 5 here); "
        f"resume it with its own values (its multirun.yaml), or choose another "
        f"hydra.sweep.dir")
    again = cli(tmp_path, "-m", "seed=0,1", *where, data_root=data_root)
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"error: {sweep_dir} holds a sweep already (MLflow parent run {parent}, 0 jobs): "
        f"resume=auto continues it; choose another hydra.sweep.dir for a new one")
    with sweep_lock(sweep_dir):  # another command runs the sweep
        busy = cli(tmp_path, "-m", "seed=0,1", *where, "resume=auto", data_root=data_root)
    assert busy.returncode == 2
    assert re.fullmatch(rf"error: {sweep_dir} is in use: another command is running this "
                        rf"sweep; wait for it to end, or choose another hydra.sweep.dir "
                        rf"\(held by pid \d+ on .+\)", busy.stderr.strip())
    assert client.get_run(parent).info.status == "FINISHED"  # left as it was
    assert [run.info.run_id for run in client.search_runs([experiment])] == [parent]


# The job's side, without training: a stand-in for the training that counts its calls.

@pytest.fixture
def recorded_sweep(tmp_path, monkeypatch) -> Path:
    record = tmp_path / "sweep" / sweep_record.FILENAME
    record.parent.mkdir()
    write_record(record, SweepRecord(parent_run_id="parent"))
    monkeypatch.setenv(sweep_record.RECORD_ENV, str(record))
    return record


def job(record: Path, folder: str, *overrides: str, retry: bool = False):
    cfg = compose_config(list(overrides))
    if retry:
        with open_dict(cfg):
            cfg.retry_failed = True
    return cfg, JobContext(record.parent / folder, tuple(overrides), "job", int(folder))


def test_a_failed_job_is_skipped_unless_retried(recorded_sweep):
    calls = []

    def train(result: float) -> Callable[[JobContext], float]:
        return lambda context: calls.append(context.folder.name) or result

    assert math.isnan(run_in_sweep(*job(recorded_sweep, "0", "seed=3"), train(math.nan)))
    assert read_record(recorded_sweep).jobs["0"].status == FAILED
    assert math.isnan(run_in_sweep(*job(recorded_sweep, "0", "seed=3"), train(0.5)))
    assert calls == ["0"]  # skipped
    assert run_in_sweep(*job(recorded_sweep, "0", "seed=3", retry=True), train(0.5)) == 0.5
    assert run_in_sweep(*job(recorded_sweep, "0", "seed=3"), train(0.7)) == 0.5  # finished
    assert calls == ["0", "0"]
    entry = read_record(recorded_sweep).jobs["0"]
    assert (entry.status, entry.precision, entry.overrides) == (FINISHED, 0.5, "seed=3")


def test_a_job_is_found_by_its_config_not_its_number(recorded_sweep):
    folders = []
    train = lambda context: folders.append(context.folder.name) or 0.25  # noqa: E731
    run_in_sweep(*job(recorded_sweep, "0", "seed=1"), train)
    # The grid grew: seed=1 is job 1 now, and a new point is job 0.
    assert run_in_sweep(*job(recorded_sweep, "1", "seed=1"), train) == 0.25
    run_in_sweep(*job(recorded_sweep, "0", "seed=2"), train)
    assert folders[0] == "0" and re.fullmatch(r"0_[0-9a-f]{8}", folders[1])
    assert set(read_record(recorded_sweep).jobs) == {"0", folders[1]}
    # The digest leaves out where things live and how to resume.
    same = compose_config(["seed=1", "resume=auto", "tracking.flush_seconds=0",
                           "checkpoint.every=7"])
    assert run_in_sweep(same, JobContext(recorded_sweep.parent / "5", (), "job", 5),
                        train) == 0.25
    assert folders == ["0", folders[1]]


def test_the_meaning_of_a_sweep_is_its_values_that_no_run_swept():
    recorded = {"steps": 4, "seed": 0, "optimizer.lr": 0.001}
    assert sweep_record.changed_meaning(recorded, {"steps": 4, "seed": 0}) == []  # lr swept now
    assert sweep_record.changed_meaning(recorded, {"steps": 5, "seed": 0}) == [
        "steps=4 there, 5 here"]
    assert sweep_record.still_fixed(recorded, {"steps": 4, "seed": 1}) == {"steps": 4}


def test_keys_the_sweep_varies_keep_its_jobs_apart_even_where_they_only_say_where():
    a = {"steps": 4, "tracking.registered_model_name": "a"}
    b = {"steps": 4, "tracking.registered_model_name": "b"}
    assert sweep_record.config_digest(a) == sweep_record.config_digest(b)  # where, not what
    swept = ["tracking.registered_model_name"]
    assert sweep_record.config_digest(a, swept) != sweep_record.config_digest(b, swept)


def test_a_moved_job_takes_only_its_own_threads_log_files(tmp_path):
    """Packed members share the root logger, each file taking its own thread's lines: a
    member moved to its recorded folder must not take another member's file along."""
    old, new = tmp_path / "0", tmp_path / "1"
    old.mkdir()
    own, other, plain = (logging.FileHandler(old / name, delay=True)
                         for name in ("run.log", "other.log", "plain.log"))
    this_thread = threading.current_thread().name
    own.addFilter(lambda record: record.threadName == this_thread)
    other.addFilter(lambda record: record.threadName == "job 7")
    root = logging.getLogger()
    for handler in (own, other, plain):
        root.addHandler(handler)
    try:
        follow_log_files(old, new)
    finally:
        for handler in (own, other, plain):
            root.removeHandler(handler)
            handler.close()
    assert Path(own.baseFilename) == new / "run.log"
    assert Path(plain.baseFilename) == new / "plain.log"  # a job's own process: all its files
    assert Path(other.baseFilename) == old / "other.log"
