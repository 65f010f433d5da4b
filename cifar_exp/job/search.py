"""A training job as a trial of an Optuna search (the job side of
hydra_plugins.cifar_exp_optuna): each periodic evaluation is reported to the job's trial,
and when the study's pruner finds the trial hopeless the job stops there."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from cifar_exp.errors import Pruned

if TYPE_CHECKING:
    import optuna

PRUNED_AT = "pruned_at_step"  # the trial attribute that tells the sweeper why a job ended
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "successive_halving", "none")


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna  # here: only searches pay for it (and not Hydra's --help)

    chosen = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    return chosen[name](seed=seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The pruner `name`, built alike by the sweeper and by each trial's job (Optuna keeps
    a study's pruner in memory, not in its storage)."""
    import optuna

    if name == "median":  # against the median of the trials so far, once two completed
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    return {"successive_halving": optuna.pruners.SuccessiveHalvingPruner,
            "none": optuna.pruners.NopPruner}[name]()


def trial_reporter(cfg: DictConfig) -> Callable[[int, float], None] | None:
    """A callback for each evaluation's (step, precision) that reports it to the trial the
    Optuna sweeper set in `cfg.trial`, and raises Pruned when the pruner says so; None
    for a job that is no trial."""
    if cfg.trial.storage is None:
        return None
    import optuna  # only search jobs pay for it

    storage = optuna.storages.get_storage(cfg.trial.storage)
    study = optuna.load_study(study_name=cfg.trial.study, storage=storage,
                              pruner=make_pruner(cfg.trial.pruner))
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(cfg.trial.study), cfg.trial.number)
    trial = optuna.trial.Trial(study, trial_id)

    def report(step: int, precision: float) -> None:
        trial.report(precision, step)
        if trial.should_prune():
            trial.set_user_attr(PRUNED_AT, step)
            raise Pruned(cfg.trial.number, step, precision)

    return report
