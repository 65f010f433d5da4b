"""A training job as a trial of an Optuna study: it reports, and stops when pruned."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf

from cifar_exp.errors import Pruned
from cifar_exp.job.search import PRUNED_AT, trial_reporter


def test_a_job_that_is_no_trial_reports_nowhere():
    assert trial_reporter(OmegaConf.create({"trial": {"storage": None}})) is None


def test_a_trial_reports_its_evaluations_and_stops_when_pruned(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for value in (0.5, 0.6):  # two trials done: the median pruner compares with them
        trial = study.ask()
        trial.report(value, 10)
        study.tell(trial, value)
    trial = study.ask()
    cfg = OmegaConf.create({"trial": {"storage": storage, "study": "s",
                                      "number": trial.number, "pruner": "median"}})
    report = trial_reporter(cfg)
    with pytest.raises(Pruned, match=r"trial 2 pruned at step 10 \(precision 0.2000\)"):
        report(10, 0.2)  # under the median of 0.5 and 0.6
    stored = study.get_trials(deepcopy=False)[2]
    assert stored.intermediate_values == {10: 0.2}
    assert stored.user_attrs == {PRUNED_AT: 10}


def test_a_trial_above_the_median_goes_on(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for value in (0.5, 0.6):
        trial = study.ask()
        trial.report(value, 10)
        study.tell(trial, value)
    cfg = OmegaConf.create({"trial": {"storage": storage, "study": "s",
                                      "number": study.ask().number, "pruner": "median"}})
    trial_reporter(cfg)(10, 0.7)  # no Pruned
