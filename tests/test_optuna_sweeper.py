"""cifar_exp's Optuna sweeper: a persisted study, resumed, with hopeless trials pruned."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import optuna
import pytest
import requests
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient

from cifar_exp.errors import ConfigError
from hydra_plugins.cifar_exp_optuna.optuna_sweeper import OptunaSweeper, distribution
from tests.conftest import cli, copy_store, free_port, stop_process_group

State = optuna.trial.TrialState


@pytest.mark.parametrize("text,expected", [
    ("interval(0.0, 96.0)", optuna.distributions.FloatDistribution(0.0, 96.0)),
    ("tag(log, interval(1e-4, 1e-2))", optuna.distributions.FloatDistribution(1e-4, 1e-2,
                                                                                log=True)),
    ("tag(int, interval(1, 8))", optuna.distributions.IntDistribution(1, 8)),
    ("choice(64, 128, 256)", optuna.distributions.CategoricalDistribution([64, 128, 256])),
    ("choice(adam, sgd)", optuna.distributions.CategoricalDistribution(["adam", "sgd"])),
    ("range(1, 4)", optuna.distributions.CategoricalDistribution([1, 2, 3])),
])
def test_hydras_sweep_syntax_becomes_a_search_space(text, expected):
    [override] = OverridesParser.create().parse_overrides([f"key={text}"])
    assert distribution(override) == expected


@pytest.mark.parametrize("options,message", [
    ({"storage": "bogus://"}, "hydra.sweeper.storage=bogus:// is not a database URL ("),
    ({"storage": "sqlite:////nowhere/optuna.db"},
     "hydra.sweeper.storage=sqlite:////nowhere/optuna.db: folder /nowhere does not exist"),
    ({"storage": "mysql+nodriver://u:secret@host/db"}, "hydra.sweeper.storage=mysql+nodriver:"
                                                       "//***@host/db is not a database URL"),
    ({"sampler": "grid"}, "hydra.sweeper.sampler=grid is not one of tpe, random"),
    ({"pruner": "hyperband"}, "hydra.sweeper.pruner=hyperband is not one of median, "),
    ({"direction": "up"}, "hydra.sweeper.direction=up is not one of maximize, minimize"),
    ({"n_trials": 0}, "hydra.sweeper.n_trials=0 must be a positive integer"),
    ({"n_jobs": "two"}, "hydra.sweeper.n_jobs=two must be a positive integer"),
    ({"seed": 1.5}, "hydra.sweeper.seed=1.5 must be an integer or null"),
    ({"study_name": ""}, "hydra.sweeper.study_name='' must be a non-empty name"),
    ({"params": {"optimizer.lr": "0.1"}}, "hydra.sweeper.params.optimizer.lr=0.1 is not a "
                                          "search space; use interval(a, b)"),
    ({"params": {"optimizer.lr": "interval(1,"}}, "hydra.sweeper.params.optimizer.lr="
                                                  "interval(1, cannot be read ("),
])
def test_options_the_sweeper_cannot_run_with_are_refused_in_one_line(options, message):
    with pytest.raises(ConfigError) as error:
        OptunaSweeper.check_options(options)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value) and "secret" not in str(error.value)


def test_a_bad_sweeper_option_is_refused_before_the_sweep_opens_its_parent(tmp_path, data_root,
                                                                           store):
    result = cli(tmp_path, "-m", "hparams_search=tf_cnn_optuna", "hydra.sweeper.n_trials=1",
                 "hydra.sweeper.storage=bogus://", f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 2
    assert result.stderr.startswith("error: hydra.sweeper.storage=bogus:// is not a database")
    assert len(result.stderr.strip().splitlines()) == 1
    client = MlflowClient(store)  # no sweep parent was opened
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_trials_a_stopped_sweep_left_running_are_failed(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}")
    study.tell(study.ask(), 1.0)
    study.ask()  # its sweep was stopped: never told
    OptunaSweeper._close_abandoned(study)
    assert [trial.state for trial in study.trials] == [State.COMPLETE, State.FAIL]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_search_asks_new_points_reproducibly(tmp_path, sampler):
    space = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}

    def ask_and_tell(study, count):
        asked = []
        for _ in range(count):
            trial = study.ask(space)
            study.tell(trial, trial.params["lr"])
            asked.append(trial.params["lr"])
        return asked

    def resumed_points(folder):
        storage = f"sqlite:///{folder / 'o.db'}"
        sweeper = OptunaSweeper(sampler=sampler, seed=3)
        first = ask_and_tell(sweeper._open_study(storage), 3)
        return first, ask_and_tell(sweeper._open_study(storage), 3)  # the same command again

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, resumed = resumed_points(tmp_path / "a")
    assert not set(first) & set(resumed)  # not the first points replayed
    assert resumed_points(tmp_path / "b") == (first, resumed)  # the same seed, the same search


# The random sampler with seed 41 asks lr 0.003, 0.003, then 1e-9: the third trial, still
# at its initial weights, falls under the median of the first two at step 20 and is pruned.
# Resumed after 3 trials, the sampler is seeded with 41 + 3, whose first ask is 0.003.
# The trials are compared at step 20, the evaluation they report (one at the last step is
# not reported: it ends the trial anyway): so they run 21 steps. At step 20 a trial of
# 32-image batches scores 0.175 on the first 200 test images, one at its initial weights
# 0.105 (with 128-image batches and 500 images, 0.188 and 0.102).
SEARCH = ("hydra/sweeper=optuna", "hydra.sweeper.sampler=random", "hydra.sweeper.seed=41",
          "hydra.sweeper.study_name=lr", "optimizer.lr=choice(0.003,0.000000001)",
          "steps=21", "log_every=20", "eval_every=20", "batch_size=32", "eval_images=200",
          "tracking.log_model=false", "tracking.system_metrics_seconds=0",
          "checkpoint.enabled=false")


@pytest.fixture(scope="module")
def first_search(tmp_path_factory, data_root, store_template):
    """The search's first command, 3 trials, in a folder of its own: (its sweep folder, its
    MLflow store, the finished command). Tests read them; one that goes on with the search
    goes on in a copy."""
    folder = tmp_path_factory.mktemp("search")
    store = copy_store(store_template, folder)
    first = cli(folder, "-m", *SEARCH, f"tracking.uri={store}",
                f"hydra.sweep.dir={folder / 'sweep'}", "hydra.sweeper.n_trials=3",
                data_root=data_root)
    return folder / "sweep", store, first


def test_a_search_is_persisted_and_a_hopeless_trial_pruned(first_search):
    sweep, store, first = first_search
    assert first.returncode == 0, first.stderr[-3000:]
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    study = optuna.load_study(study_name="lr", storage=storage)
    assert [t.state for t in study.trials] == [State.COMPLETE, State.COMPLETE, State.PRUNED]
    assert study.trials[2].params == {"optimizer.lr": 1e-9}
    assert "trial 2 pruned at step 20" in first.stderr

    client = MlflowClient(store)
    runs = {run.data.params["trial.number"]: run for run in client.search_runs(
        [client.get_experiment_by_name("cifar_exp").experiment_id])
        if "trial.number" in run.data.params}
    assert runs["2"].info.status == "KILLED"  # not FAILED: stopped by its pruner
    assert runs["2"].data.tags["pruned"].startswith("trial 2 pruned at step 20")
    assert [m.step for m in client.get_metric_history(runs["2"].info.run_id, "precision")] \
        == [20]  # it stopped there
    assert runs["0"].info.status == runs["1"].info.status == "FINISHED"


def test_a_search_is_resumed_with_more_trials(first_search, tmp_path, data_root, store):
    first_sweep, _, first = first_search
    assert first.returncode == 0, first.stderr[-3000:]
    # The same command with more trials goes on with the study where it stopped: in a copy
    # of the first command's sweep folder, which holds the study (optuna.db); its MLflow
    # runs go to a store of this test's own.
    sweep = tmp_path / "sweep"
    shutil.copytree(first_sweep, sweep)
    second = cli(tmp_path, "-m", *SEARCH, f"tracking.uri={store}", f"hydra.sweep.dir={sweep}",
                 "hydra.sweeper.n_trials=4", data_root=data_root)
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert len(study.trials) == 4 and study.trials[3].state == State.COMPLETE
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["n_trials"] == 4 and results["pruned"] == 1
    assert results["best_value"] == study.best_value


def test_a_searchs_study_is_shown_in_optuna_dashboard(first_search):
    sweep, _, first = first_search
    assert first.returncode == 0, first.stderr[-3000:]
    storage = f"sqlite:///{sweep / 'optuna.db'}"

    port = free_port()
    dashboard = subprocess.Popen(  # optuna-dashboard, as its command starts it
        [sys.executable, "-c", "import sys; from optuna_dashboard._cli import main; "
         "sys.exit(main())", storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = requests.get(f"http://127.0.0.1:{port}/api/studies", timeout=2)
                break
            except requests.ConnectionError:
                assert dashboard.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
        [shown] = studies.json()["study_summaries"]
        assert shown["study_name"] == "lr"
    finally:
        # Its server (gunicorn, where installed) stops at once on Ctrl-C's SIGINT, where
        # SIGTERM can wait 30 s for a worker to end gracefully.
        stop_process_group(dashboard, signal.SIGINT)
