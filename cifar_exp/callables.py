"""What a composed config may name for Hydra or logging to call, slot by slot.

A config file (a recipe from `--config-dir`) or an override can name a callable in a few
places: Hydra's callbacks, launcher and sweeper (`_target_`), and the handlers, formatters
and filters of its logging config (`class`, `()`). Each slot admits only the objects the
project ships or supports for it, compared as the located object after every interpolation
is resolved, so neither a module prefix (`logging.os.system`) nor an interpolation can smuggle
other code in. A log file may be written only under the run's or the sweep's folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException

from cifar_exp.errors import ConfigError

LAUNCHERS = (
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
    "hydra_plugins.cifar_exp_packed.packed_launcher.PackedLauncher",
)
SWEEPERS = (
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "hydra_plugins.cifar_exp_optuna.optuna_sweeper.OptunaSweeper",
)
CALLBACKS = (
    "cifar_exp.tracking.sweep.SweepTracking",
    "hydra.experimental.callbacks.LogJobReturnCallback",
)
LOG_HANDLERS = (
    "logging.StreamHandler", "logging.FileHandler", "logging.NullHandler",
    "logging.handlers.RotatingFileHandler", "logging.handlers.TimedRotatingFileHandler",
    "logging.handlers.WatchedFileHandler",
)
LOG_FORMATTERS_AND_FILTERS = (
    "logging.Formatter", "logging.Filter", "cifar_exp.tracking.redact.RedactingFilter",
)
# Modules a name is looked up in at all: importing any other module could run its code.
TRUSTED_ROOTS = ("cifar_exp", "hydra", "hydra_plugins", "logging")
LOGGING_SECTIONS = ("job_logging", "hydra_logging")
# Where a log handler's file may go: under the job's output folder, named by the job.
OUTPUT_DIR = ("${hydra.runtime.output_dir}/", "${hydra:runtime.output_dir}/")
JOB_NAME_PARTS = ("${hydra.job.name}", "${hydra:job.name}", "${hydra.job.num}",
                  "${hydra:job.num}", "${hydra.job.id}", "${hydra:job.id}")
STANDARD_STREAMS = ("ext://sys.stdout", "ext://sys.stderr")


def check_callables(cfg: DictConfig) -> None:
    """Refuse, in one line, a composed config (Hydra's node included) that names anything
    to be called outside the objects its slot admits, or a log file outside the job's
    folder. Run before Hydra instantiates anything."""
    tree = resolved(cfg)
    for path, value in _walk(tree, ()):
        _check(path, value, tree)


def resolved(node: Any) -> Any:
    """`node` as plain dicts and lists, every interpolation resolved that can be now; one
    that cannot (Hydra's runtime values, set when a job starts) is kept as written."""
    if isinstance(node, DictConfig):
        return {key: resolved(_value(node, key)) for key in node}
    if isinstance(node, ListConfig):
        return [resolved(_value(node, index)) for index in range(len(node))]
    return node


def _value(node: DictConfig | ListConfig, key: Any) -> Any:
    try:
        return node[key]
    except OmegaConfBaseException:
        return node._get_node(key)._value()  # as written, e.g. "${hydra.runtime.output_dir}"


def _walk(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every leaf and of every key that gets called."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = (*path, str(key))
            if key in _calling_keys(child):
                yield child, value
            else:
                yield from _walk(value, child)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, (*path, f"[{index}]"))
    else:
        yield path, node


def _in_logging(path: tuple[str, ...]) -> bool:
    return len(path) > 2 and path[0] == "hydra" and path[1] in LOGGING_SECTIONS


def _calling_keys(path: tuple[str, ...]) -> tuple[str, ...]:
    """The keys whose value gets called at `path`: instantiate's `_target_` anywhere, and in
    a logging config also logging.config's `class` and `()` (and `.`, attributes it sets)."""
    return ("_target_", "class", "()", ".") if _in_logging(path) else ("_target_",)


def _check(path: tuple[str, ...], value: Any, tree: dict) -> None:
    dotted = ".".join(path).replace(".[", "[")
    key = path[-1]
    in_logging = _in_logging(path)
    if key in _calling_keys(path):
        admitted = _admitted(path, in_logging)
        if admitted is None:
            raise ConfigError(
                f"{dotted}={value}: only hydra.callbacks, hydra.launcher, hydra.sweeper and "
                f"the handlers, formatters and filters of Hydra's logging may name code; a "
                f"config file may not run other code: remove it")
        what, names = admitted
        if not (isinstance(value, str) and _is_one_of(value, names)):
            raise ConfigError(
                f"{dotted}={value} is not one of the {what} the project supports "
                f"({', '.join(names)}); a config file may not run other code: remove it")
    elif in_logging and isinstance(value, str) and value.startswith("ext://") \
            and value not in STANDARD_STREAMS:
        raise ConfigError(f"{dotted}={value}: a log config may name only the standard "
                          f"streams ({', '.join(STANDARD_STREAMS)}); remove it")
    elif in_logging and key == "filename" and not _under_job_folder(value, tree):
        raise ConfigError(
            f"{dotted}={value}: a log handler may write only under the job's folder; write "
            f"{OUTPUT_DIR[0]}{JOB_NAME_PARTS[0]}.log or a name under it")


def _admitted(path: tuple[str, ...], in_logging: bool) -> tuple[str, tuple[str, ...]] | None:
    """(what the slot holds, the names it admits) for the callable key at `path`; None for
    a place that may name no code."""
    key = path[-1]
    if in_logging and len(path) == 5 and key in ("class", "()"):
        if path[2] == "handlers":
            return "log handlers", LOG_HANDLERS
        if path[2] in ("formatters", "filters"):
            return "log formatters and filters", LOG_FORMATTERS_AND_FILTERS
        return None
    if key != "_target_" or path[0] != "hydra":
        return None
    if path[1:] == ("launcher", "_target_"):
        return "launchers", LAUNCHERS
    if path[1:] == ("sweeper", "_target_"):
        return "sweepers", SWEEPERS
    if len(path) == 4 and path[1] == "callbacks":
        return "Hydra callbacks", CALLBACKS
    return None


def _is_one_of(name: str, names: tuple[str, ...]) -> bool:
    """Whether `name` locates to the object of one of `names` (an older module path of the
    same class included); a name outside TRUSTED_ROOTS is never imported."""
    if name in names:
        return True
    if name.split(".")[0] not in TRUSTED_ROOTS:
        return False
    found = _locate(name)
    return found is not None and any(found is _locate(admitted) for admitted in names)


def _locate(name: str) -> object | None:
    """The object a dotted name stands for (found as Hydra finds a `_target_`), or None
    where there is none."""
    try:
        return get_object(name)
    except Exception:  # Hydra's ImportError or ValueError: nothing by that name
        return None


def _under_job_folder(value: Any, tree: dict) -> bool:
    """Whether a log handler's `filename` lies under the job's output folder (as Hydra's
    own default writes it) or under the run's or the sweep's folder."""
    if not isinstance(value, str):
        return False
    for prefix in OUTPUT_DIR:
        if value.startswith(prefix):
            rest = value[len(prefix):]
            for part in JOB_NAME_PARTS:
                rest = rest.replace(part, "job")
            return "$" not in rest and _inside(rest)
    hydra = tree.get("hydra", {})
    folders = [hydra.get("run", {}).get("dir"), hydra.get("sweep", {}).get("dir")]
    return any(isinstance(folder, str) and "$" not in folder and value.startswith(folder + "/")
               and _inside(value[len(folder) + 1:]) for folder in folders)


def _inside(relative: str) -> bool:
    """Whether a relative path stays below its folder (no `..`, not absolute)."""
    path = PurePosixPath(relative)
    return bool(relative) and not path.is_absolute() and ".." not in path.parts
