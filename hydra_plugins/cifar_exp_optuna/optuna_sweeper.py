"""An Optuna search as a Hydra sweeper, on current Optuna: `hydra/sweeper=optuna`.

The study is persisted (by default in `optuna.db` in the sweep folder; `storage=` names
another): the same command run again goes on with the study where it stopped, up to
`n_trials` trials in all, and optuna-dashboard shows it. Each trial is one job of the
launcher (so `hydra/launcher=joblib` runs `n_jobs` trials at a time); the job reports each
periodic evaluation to its trial, and stops when the pruner (`median`, `successive_halving`
or `none`) finds it hopeless: such a trial is PRUNED in the study, and its MLflow run says
where it was pruned.

The search space is `params` (Hydra's sweep syntax: `interval(a, b)`, `tag(log,
interval(a, b))`, `tag(int, interval(a, b))`, `choice(a, b, ...)`, `range(a, b)`), plus any
sweep given on the command line; plain values given on the command line hold for every
trial."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from cifar_exp.errors import ConfigError, one_line
from cifar_exp.job.search import PRUNED_AT, PRUNERS, SAMPLERS, make_pruner, make_sampler
from cifar_exp.tracking.redact import redact

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

RESULTS = "optimization_results.yaml"  # best params and value, read by the sweep report
def distribution(override: Override) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of one sweep override of Hydra's syntax."""
    import optuna

    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):  # Optuna takes numbers, strings, booleans, None
        return optuna.distributions.CategoricalDistribution(
            [value if value is None or isinstance(value, bool | int | float | str)
             else str(value) for value in sweep.list])
    if isinstance(sweep, RangeSweep):
        return optuna.distributions.CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in sweep.tags
        if "int" in sweep.tags:  # Hydra reads an interval's ends as floats
            return optuna.distributions.IntDistribution(int(sweep.start), int(sweep.end),
                                                        log=log_scale)
        return optuna.distributions.FloatDistribution(sweep.start, sweep.end, log=log_scale)
    raise ValueError(f"{override.input_line}: not a search space (use interval, choice or "
                     f"range)")


def check_search_space(key: str, space: Any) -> None:
    """Refuse a search space of `params` that is not one of Hydra's sweeps Optuna takes."""
    line = f"{key}={space}"
    try:
        override = OverridesParser.create().parse_override(line)
    except Exception as error:  # Hydra's grammar: its message says where
        raise ConfigError(f"hydra.sweeper.params.{line} cannot be read ({one_line(error)})"
                          ) from error
    if not isinstance(override.value(), ChoiceSweep | RangeSweep | IntervalSweep):
        raise ConfigError(f"hydra.sweeper.params.{line} is not a search space; use "
                          f"interval(a, b), tag(log, interval(a, b)), choice(a, b, ...) or "
                          f"range(a, b)")


def check_storage(storage: str) -> None:
    """Refuse an Optuna storage URL that names no database SQLAlchemy can open, a driver
    that is not installed, or an SQLite file in a folder that does not exist; without
    connecting (a server that does not answer is Optuna's to report)."""
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(storage)
        url.get_dialect().import_dbapi()
    except ModuleNotFoundError as error:
        raise ConfigError(f"hydra.sweeper.storage={redact(storage)} needs the database "
                          f"driver {error.name}; install it or name another storage") from error
    except Exception as error:  # unparseable, or a dialect SQLAlchemy does not know
        raise ConfigError(f"hydra.sweeper.storage={redact(storage)} is not a database URL "
                          f"({redact(one_line(error))}); give e.g. sqlite:///<path>/optuna.db, or "
                          f"leave it out for <sweep folder>/optuna.db") from error
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folder = Path(url.database).absolute().parent
        if not folder.is_dir():
            raise ConfigError(f"hydra.sweeper.storage={redact(storage)}: folder {folder} "
                              f"does not exist; create it or choose another path")


class OptunaSweeper(Sweeper):
    @staticmethod
    def check_options(options: dict[str, Any]) -> None:
        """Refuse, in one line, options this sweeper cannot run with; called on the
        composed config before the sweep starts (and again when Hydra builds it)."""
        chosen = {"direction": ("maximize", "minimize"), "sampler": SAMPLERS,
                  "pruner": PRUNERS}
        for key, allowed in chosen.items():
            if options.get(key, allowed[0]) not in allowed:
                raise ConfigError(f"hydra.sweeper.{key}={options[key]} is not one of "
                                  f"{', '.join(allowed)}")
        for key in ("n_trials", "n_jobs"):
            value = options.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"hydra.sweeper.{key}={value} must be a positive integer")
        seed = options.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"hydra.sweeper.seed={seed} must be an integer or null")
        name = options.get("study_name", "search")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"hydra.sweeper.study_name={name!r} must be a non-empty name")
        if options.get("storage") is not None:
            check_storage(str(options["storage"]))
        params = options.get("params") or {}
        if not isinstance(params, Mapping):  # a dict, or Hydra's DictConfig
            raise ConfigError(f"hydra.sweeper.params={params} must map keys to search "
                              f"spaces, e.g. optimizer.lr: tag(log, interval(1e-4, 1e-2))")
        for key, space in params.items():
            check_search_space(key, space)

    def __init__(self, *, direction: str = "maximize", study_name: str = "search",
                 storage: str | None = None, n_trials: int = 20, n_jobs: int = 1,
                 sampler: str = "tpe", seed: int | None = 0, pruner: str = "median",
                 params: dict[str, str] | None = None) -> None:
        self.check_options({key: value for key, value in locals().items()
                            if key not in ("self", "__class__")})
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.sampler, self.seed, self.pruner = sampler, seed, pruner
        self.params = dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def sweep(self, arguments: list[str]) -> list[Any]:
        parser = OverridesParser.create()
        given = parser.parse_overrides(arguments)
        searched = parser.parse_overrides([f"{key}={value}" for key, value in
                                           self.params.items()])
        space = {override.get_key_element(): distribution(override)
                 for override in [*searched, *(o for o in given if o.is_sweep_override())]}
        fixed = [override.input_line for override in given if not override.is_sweep_override()]
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage or f"sqlite:///{(self.sweep_dir / 'optuna.db').resolve()}"
        study = self._open_study(storage)
        done = len(study.trials)
        log.info("Optuna study %r in %s: %d of %d trials done; see it with: optuna-dashboard "
                 "%s", self.study_name, storage, done, self.n_trials, storage)
        returns: list[Any] = []
        while len(study.trials) < self.n_trials:
            batch = min(self.n_jobs, self.n_trials - len(study.trials))
            trials = [study.ask(space) for _ in range(batch)]
            jobs = [[*fixed, *self._trial_overrides(trial, storage)] for trial in trials]
            results = self.launcher.launch(jobs, initial_job_idx=trials[0].number)
            for trial, result in zip(trials, results, strict=True):
                self._tell(study, trial, result)
            returns.append(results)
        self._write_results(study)
        return returns

    def _open_study(self, storage: str) -> optuna.Study:
        """The study in `storage`, created or resumed, with the trials a stopped sweep left
        running failed. Its sampler is seeded with `seed` plus the trials already there, so
        a resumed search is reproducible and asks new points instead of replaying the
        first ones (a sampler's state lives in memory, not in the storage)."""
        import optuna

        study = optuna.create_study(
            study_name=self.study_name, storage=storage, direction=self.direction,
            sampler=make_sampler(self.sampler, self.seed), pruner=make_pruner(self.pruner),
            load_if_exists=True)
        self._close_abandoned(study)
        if study.trials and self.seed is not None:
            study.sampler = make_sampler(self.sampler, self.seed + len(study.trials))
        return study

    def _trial_overrides(self, trial: optuna.trial.Trial, storage: str) -> list[str]:
        """The trial's values, and where it reports its evaluations (cifar_exp's `trial`
        config keys)."""
        values = [f"{key}={value}" for key, value in trial.params.items()]
        return [*values, f"trial.storage={storage}", f"trial.study={self.study_name}",
                f"trial.number={trial.number}", f"trial.pruner={self.pruner}"]

    @staticmethod
    def _tell(study: optuna.Study, trial: optuna.trial.Trial, result: Any) -> None:
        """Record a finished job: PRUNED if it stopped on the pruner's word, FAIL if it
        failed or gave no number, else COMPLETE with its precision."""
        import optuna

        # What the job wrote to its trial, read back from the storage.
        attributes = study.get_trials(deepcopy=False)[trial.number].user_attrs
        try:
            value = result.return_value
        except Exception as error:  # the job raised
            log.warning("trial %d failed: %s", trial.number, error)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        if PRUNED_AT in attributes:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, float(value))

    @staticmethod
    def _close_abandoned(study: optuna.Study) -> None:
        """Trials left RUNNING by a sweep that was stopped: failed, so the search goes on
        (one sweep at a time works on a study)."""
        import optuna

        for trial in study.get_trials(deepcopy=False,
                                      states=[optuna.trial.TrialState.RUNNING]):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            log.warning("trial %d was left running by a stopped sweep: marked FAIL",
                        trial.number)

    def _write_results(self, study: optuna.Study) -> None:
        import optuna

        complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
        results: dict[str, Any] = {"name": "optuna", "n_trials": len(study.trials),
                                   "pruned": len(study.get_trials(
                                       states=[optuna.trial.TrialState.PRUNED]))}
        if complete:
            results.update(best_params=study.best_params, best_value=study.best_value)
        (self.sweep_dir / RESULTS).write_text(yaml.safe_dump(results))
        log.info("best of %d complete trials: %s", len(complete),
                 f"{study.best_value} with {study.best_params}" if complete else "none")

