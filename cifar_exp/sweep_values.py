"""Each value a sweep gives a key, checked before the sweep starts: Hydra composes a job's
config only when the job is launched, so a value of the wrong type, an option that does
not exist or a value that cannot work (`steps=0`) would otherwise end the sweep midway,
after the jobs before it trained, with its MLflow parent FAILED. The options a builder
refuses (a momentum torch does not take) are found by building the parts once for each
such value (the command passes training.build's check in)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, RangeSweep
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from cifar_exp.config import BUILDER_GROUPS, validate
from cifar_exp.errors import ConfigError, no_such_option

# The keys the builders read: a swept value of one is built once before the sweep starts.
BUILT_FROM = {*BUILDER_GROUPS, "steps", "batch_size", "device", "amp", "compile",
              "cuda_graph", "channels_last"}


def check_sweep_values(cfg: DictConfig, overrides: Sequence[str],
                       group_options: Callable[[str], list[str]],
                       check_builders: Callable[[DictConfig], None]) -> None:
    """Refuse, in one line, the first value of a swept key (`key=a,b`, `key=range(..)`)
    that the sweep's config `cfg` cannot take alone, or a config that cannot work even
    before any value is set. A search space (`interval(..)`) is the sweeper's to check.
    Each value is tried on its own, so the cost grows with the values, not the grid.
    `group_options(key)`: the options of config group `key` (none for a key);
    `check_builders(cfg)`: raises what the parts' builders refuse."""
    base = _without_hydra(cfg)
    swept = [override for override in OverridesParser.create().parse_overrides(list(overrides))
             if isinstance(override.value(), ChoiceSweep | RangeSweep)]
    keys = [override.get_key_element().lstrip("+~") for override in swept]
    groups = {key: options for key in keys if (options := group_options(key))}
    # With a config group swept, the base config holds its default option, whose builder
    # may not take the values meant for the others: the builders check each job then.
    builders = not groups
    validate(base)
    if builders:
        check_builders(base)
    if not any(key.split(".")[0] == "data" for key in keys):
        _check_data(base)
    for key, override in zip(keys, swept, strict=True):
        if key in groups:  # each value names one of the group's config files
            for option in override.sweep_string_iterator():
                if option not in groups[key]:
                    raise ConfigError(no_such_option(key, option, groups[key]))
            continue
        for typed, value in zip(override.sweep_string_iterator(), override.sweep_iterator(),
                                strict=True):
            trial = base.copy()
            try:
                OmegaConf.update(trial, key, value, merge=True)
            except OmegaConfBaseException as error:
                raise ConfigError(f"{key}={typed}: {str(error).splitlines()[0]}; give {key} "
                                  f"a value of its type") from error
            validate(trial)
            if builders and key.split(".")[0] in BUILT_FROM:
                check_builders(trial)
            if key.split(".")[0] == "data":
                _check_data(trial)


def _check_data(cfg: DictConfig) -> None:
    """Refuse a data set that is not where the config says (and is not to be fetched)."""
    from cifar_exp.data import data_files  # torch: imported by the sweep's jobs anyway

    if not cfg.data.download:
        data_files(cfg.data.name, cfg.data.root)


def _without_hydra(cfg: DictConfig) -> DictConfig:
    task = cfg.copy()
    with open_dict(task):
        task.pop("hydra", None)
    return task
