"""The typed schema of a run's configuration, and the value checks done before any work.

The schema is where every key's default is written (conf/config.yaml repeats none of them);
its comments say what each key is, and docs/configuration.md lists them (a test compares).

It imports nothing that trains: the allowed values of the speed options come from
cifar_exp.speed, so validating a config builds no model and starts no process group."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from cifar_exp.callables import check_callables, resolved
from cifar_exp.errors import ConfigError, one_line_composition_error, removes_needed_key
from cifar_exp.speed import check_amp, check_compile, check_cuda_graph, check_tta

DEVICES = ("auto", "cpu", "cuda")
# Groups whose options are their builder's keyword arguments (checked by the registry).
RESUME_AUTO = "auto"  # resume=auto: continue if this job has a checkpoint, else start
# Config keys that say where things live or how to run, not what is trained: they may
# differ between a run and its resumption, and between runs of the same sweep job. Every
# other key must match, or the result would not be the run's.
FREE_KEYS = ("resume", "retry_failed", "checkpoint.", "tracking.", "data.root",
             "data.download", "data.verify", "data.manifest")
BUILDER_GROUPS = ("model", "optimizer", "schedule", "augmentation")
SEED_RANGE = (-(2**63), 2**64)  # what torch.manual_seed takes
MAX_EXPERIMENT_NAME_LENGTH = 500  # MLflow's (mlflow.utils.validation)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# The data folder when none is configured: $CIFAR_EXP_DATA, else ./data.
DATA_ROOT_ENV = "CIFAR_EXP_DATA"
DEFAULT_DATA_ROOT = "./data"
# The MLflow store when none is configured: an SQLite file in the working directory.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Groups whose entry in the defaults list is `null`: `+group=option` (the form a group
# missing from the defaults needs) is taken as `group=option`, which Hydra requires here.
NULL_DEFAULT_GROUPS = ("experiment", "hparams_search", "debug")
# Keys that were renamed: old name -> new name. `precision` names the accuracy metric; the
# numeric format of the step is `amp`.
RENAMED_KEYS = {"precision": "amp"}


@dataclass
class DataConfig:
    name: str = "cifar10"  # the data set: cifar10 | cifar100 (chosen with data=)
    # The folder that holds cifar-10-batches-bin/ or -py/ (cifar-100-binary/ or -python/):
    # $CIFAR_EXP_DATA, else ./data under the working directory.
    root: str = f"${{oc.env:{DATA_ROOT_ENV},{DEFAULT_DATA_ROOT}}}"
    download: bool = False  # true: fetch the official archive if it is absent
    verify: bool = False  # check the files' MD5s (the official ones, or `manifest`'s)
    manifest: str | None = None  # a file of `md5  path` lines; given, it implies verify


@dataclass
class EmaConfig:
    # Evaluate (and log) a moving average of the weights with this decay per step, in
    # [0, 1), e.g. 0.9999 (optimizer=sgd_decay); null: the trained weights themselves.
    decay: float | None = None


@dataclass
class LookaheadConfig:
    every: int | None = None  # steps between averages (airbench94: 5); null: off
    decay: float = 0.95  # in [0, 1]: an update keeps decay**every x (step/steps)**3 of it
    start_epochs: int = 0  # the averaging starts in this epoch (counted from 0)
    reset_each_epoch: bool = False  # also reset the weights to the average at each epoch end


@dataclass
class TrackingConfig:
    uri: str = DEFAULT_TRACKING_URI  # the MLflow store: sqlite:///<file>, a database or server
    experiment: str = "cifar_exp"  # the MLflow experiment (each recipe names its own)
    log_model: bool = True  # log the trained model (servable) to the run
    registered_model_name: str | None = None  # a name: also register the model under it
    flush_seconds: float = 10.0  # seconds: metric points are written at most this often
    # Seconds between samples of CPU, memory, disk, network (and GPU where present); 0: none.
    system_metrics_seconds: float = 10.0
    # key=value ...: the configuration a sweep's report compares the others with (paired by
    # seed where it can; docs/sweeps.md); null: no comparison.
    baseline: str | None = None


@dataclass
class CheckpointConfig:
    enabled: bool = True  # false: none is written (a stopped run cannot be resumed)
    every: int | None = 1000  # steps between checkpoints (and one at the end); 0 or null: end only
    path: str | None = None  # null: checkpoint.pt in the run's output folder (hydra.run.dir)


@dataclass
class TrialConfig:
    """Set by the Optuna sweeper, never by hand: the trial this job is, so that it reports
    its evaluations and stops when the study's pruner says so."""

    storage: str | None = None  # the study's Optuna storage URL
    study: str | None = None  # the study's name
    number: int | None = None  # the trial's number in the study
    pruner: str = "none"  # the study's pruner (search.PRUNERS), which Optuna does not store


@dataclass
class Config:
    # Group options carry a `name` (the registered builder) plus that builder's options,
    # which differ per option and are checked against the builder's signature.
    model: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    augmentation: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    # false: a new run; true: continue the run whose checkpoint is in this run's output folder
    # (hydra.run.dir=<its folder>); auto: continue if there is one, else start (for jobs a
    # cluster may resubmit); or the path of a checkpoint file to continue from.
    resume: Any = False
    # With resume=auto, a grid sweep run again in its folder skips the jobs that failed in
    # an earlier run (a diverged loss, a crash); true: runs them again, from their last
    # checkpoint. Read only by such a sweep's jobs.
    retry_failed: bool = False
    steps: int = 3000  # training steps, one batch each
    batch_size: int = 128  # training examples per step
    eval_batch_size: int = 500  # test images per forward pass
    eval_images: int | None = None  # null: the whole test set; N: its first N (quick checks)
    channels_last: bool = True  # NHWC activations (faster on CPU and GPU)
    amp: str = "auto"  # mixed precision: auto | fp32 | bf16 | fp16 (autocast; weights stay fp32)
    # auto | none | default | reduce-overhead (CUDA graphs) | max-autotune |
    # max-autotune-no-cudagraphs: torch.compile's mode for the step
    compile: str = "auto"
    # auto | true | false: replay the whole step as CUDA graphs (auto: on a GPU, not compiled)
    cuda_graph: Any = "auto"
    cudnn_benchmark: bool = True  # let cuDNN time and pick its fastest kernels (static shapes)
    label_smoothing: float = 0.0  # in [0, 1); of the training loss only, not of test_loss
    tta: str = "none"  # test-time augmentation: none | flip | flip_translate (averaged logits)
    seed: int = 0  # seeds the weights, batches and augmentations
    device: str = "auto"  # auto (a GPU if there is one) | cpu | cuda
    log_every: int = 10  # steps between log lines and metric points
    eval_every: int = 1000  # steps between evaluations on the test set (and one at the end)


def schema_defaults() -> dict[str, Any]:
    """Each key of the schema, dotted where nested (`tracking.uri`), -> its default as the
    schema gives it (interpolations unresolved), in the schema's order. The builder groups
    are left out: their keys are the chosen builder's options (conf/<group>/*.yaml)."""
    schema = OmegaConf.to_container(OmegaConf.structured(Config), resolve=False)
    assert isinstance(schema, dict)
    return _flat({key: value for key, value in schema.items() if key not in BUILDER_GROUPS})


def known_keys() -> list[str]:
    """Every key a command line may set, dotted: the schema's and each builder group
    option's (`optimizer.momentum`), for the hint at a misspelt key."""
    return list(dict.fromkeys([*schema_defaults(), *builder_keys()]))


def composition_error_line(error: Exception) -> str:
    """Hydra's composition `error` in one line, its hints drawn from this project's keys
    (as run and evaluate both say it)."""
    return one_line_composition_error(error, known_keys(), builder_keys())


def builder_keys() -> dict[str, list[str]]:
    """Each key of a builder group option (`optimizer.momentum`) -> the options of its
    group that have it (`sgd`, `sgd_decay`), from conf/<group>/*.yaml."""
    owners: dict[str, list[str]] = {}
    for group in BUILDER_GROUPS:
        for option in sorted((CONF_DIR / group).glob("*.yaml")):
            for key in OmegaConf.load(option):
                if key != "defaults":
                    owners.setdefault(f"{group}.{key}", []).append(option.stem)
    return owners


def _flat(section: dict[Any, Any], prefix: str = "") -> dict[str, Any]:
    """The leaves of nested `section`, by dotted key."""
    flat: dict[str, Any] = {}
    for key, value in section.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def key_table() -> list[str]:
    """The key and default cells, `| `key` | default |`, of docs/configuration.md's table of
    keys, a row per key of the schema: a test compares the page with them, so that a new key
    fails until it is documented there."""
    return [f"| `{key}` | {_markdown_value(value)} |" for key, value in schema_defaults().items()]


def _markdown_value(value: object) -> str:
    """`value` as YAML writes it; a string code-formatted, its `|` escaped for a table."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return "`" + value.replace("|", "\\|") + "`"
    return str(value)


def check_composed(cfg: DictConfig) -> None:
    """Refuse in one line what Hydra or the job would otherwise fail on later, with a
    traceback: code named in the config (check_callables), a key of the schema deleted
    (`~steps`), an output folder that cannot be made."""
    check_callables(cfg)
    check_plugin_options(cfg)
    for key in schema_defaults():
        if not _has_key(cfg, key):
            raise ConfigError(removes_needed_key(key))
    check_interpolations(cfg)
    if "hydra" in cfg:
        mode = OmegaConf.select(cfg, "hydra.mode", throw_on_resolution_failure=False)
        key = "hydra.sweep.dir" if str(mode) == "RunMode.MULTIRUN" else "hydra.run.dir"
        folder = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if isinstance(folder, str) and "${" not in folder:
            check_creatable(key, Path(folder))


def check_interpolations(cfg: DictConfig) -> None:
    """Refuse, in one line, an interpolation of the run's config that cannot be resolved:
    `eval_images=${nope}` (Hydra's own values aside: they are set when the job starts)."""
    for key in cfg:
        node = cfg._get_node(key)
        written = OmegaConf.to_container(node) if isinstance(node, DictConfig) else node._value()
        if key == "hydra" or "${hydra" in str(written):
            continue  # Hydra's values are set when the job starts
        try:
            if isinstance(node, DictConfig):
                OmegaConf.to_container(node, resolve=True)  # against the whole config
            else:
                cfg[key]
        except OmegaConfBaseException as error:
            where = getattr(error, "full_key", None) or key
            raise ConfigError(f"{where}: {str(error).splitlines()[0]}; give the value itself "
                              f"or an interpolation that resolves, e.g. ${{oc.env:NAME,default}}"
                              ) from error


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether dotted `key` is in `cfg`, read without resolving any value (an interpolation
    that cannot be resolved is there, and said so where it is used)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return True


def check_plugin_options(cfg: DictConfig) -> None:
    """Let the launcher and the sweeper refuse their options (a plugin class with a static
    `check_options(options)`) before Hydra builds them: by then the sweep's MLflow parent
    is open, and a refusal would leave it FAILED. Their classes are allowed ones by now
    (check_callables)."""
    for slot in ("launcher", "sweeper"):
        node = OmegaConf.select(cfg, f"hydra.{slot}", throw_on_resolution_failure=False)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        check = getattr(get_class(str(node._target_)), "check_options", None)
        if check is not None:
            options = resolved(node)
            options.pop("_target_")
            check(options)


def check_creatable(key: str, folder: Path) -> None:
    """Refuse `folder` (named by config key `key`) if it cannot be made: its nearest
    existing ancestor is not a folder, or not one this process may write in."""
    ancestor = folder.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor == folder.absolute():
        problem = None if ancestor.is_dir() else "it exists and is not a folder"
    elif not ancestor.is_dir():
        problem = f"{ancestor} is not a folder"
    else:
        problem = _cannot_make_in(ancestor)
    if problem:
        raise ConfigError(f"{key}={folder} cannot be made: {problem}; choose another folder")


def _cannot_make_in(folder: Path) -> str | None:
    """Why no folder can be made in `folder`, found by making one and removing it (the
    permission bits do not tell, e.g. for root in /proc); None if one can."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=folder))
    except OSError as error:
        return f"no folder can be made in {folder} ({error.strerror})"
    return None


def batch_scaled(value: float, reference: int, *, _root_: DictConfig) -> float:
    """`${batch_scaled:VALUE,REFERENCE}`: VALUE, given for batches of REFERENCE examples,
    scaled linearly to the run's `batch_size` (the linear scaling rule for lr and decay)."""
    return value * _root_.batch_size / reference


def register_schema() -> None:
    """Make the schema available to conf/config.yaml as `base_config`, and the config's
    resolvers to OmegaConf."""
    ConfigStore.instance().store(name="base_config", node=Config)
    if not OmegaConf.has_resolver("batch_scaled"):
        OmegaConf.register_new_resolver("batch_scaled", batch_scaled)


def command_overrides(overrides: Sequence[str]) -> list[str]:
    """Command-line arguments as Hydra should see them: `+experiment=fast94` as
    `experiment=fast94` (both forms work), and a key that was renamed refused with its new
    name, before Hydra would call it merely unknown."""
    accepted = []
    for override in overrides:
        key, _, value = override.partition("=")
        new_key = RENAMED_KEYS.get(key.lstrip("+~"))
        if new_key is not None:
            raise ConfigError(f"{override}: `{key.lstrip('+~')}` was renamed to `{new_key}`; "
                              f"write {new_key}={value}")
        if key.startswith("+") and key[1:] in NULL_DEFAULT_GROUPS:
            override = override[1:]
        accepted.append(override)
    return accepted


def compose_config(overrides: Sequence[str] = (), with_hydra: bool = False) -> DictConfig:
    """The run configuration for command-line style overrides, outside a Hydra app;
    `with_hydra` keeps Hydra's own node (sweeper, launcher, callbacks)."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=command_overrides(overrides),
                      return_hydra_config=True)
    check_composed(cfg)
    if not with_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def dotlist_entry(key: str, value: Any) -> str:
    """`key=value` that OmegaConf.from_dotlist (serving.trained's apply_overrides) reads
    back as `value` itself: a string double-quoted, all but printable ASCII escaped (YAML
    would read `a #b` as `a`, `'x'` as x); an integer, boolean or null as YAML writes it."""
    if not isinstance(value, str):
        return f"{key}={json.dumps(value)}"
    escaped = "".join(char if char.isascii() and char.isprintable() and char not in '"\\'
                      else f"\\U{ord(char):08x}" for char in value)
    return f'{key}="{escaped}"'


def split_name(group: DictConfig) -> tuple[str, dict[str, Any]]:
    """A group option's config -> (registered name, builder options)."""
    options = OmegaConf.to_container(group, resolve=True)
    assert isinstance(options, dict)
    name = options.pop("name", None)
    if not name:
        raise ConfigError(f"config group option {dict(options)} has no 'name' key")
    return str(name), options


def validate(cfg: DictConfig) -> None:
    """Reject values that cannot work, before any data is read or run is opened."""
    check_known_keys(cfg)
    check_finite(OmegaConf.to_container(cfg, resolve=True))
    for key in ("steps", "batch_size", "eval_batch_size", "log_every", "eval_every"):
        if cfg[key] <= 0:
            raise ConfigError(f"{key}={cfg[key]} must be a positive integer")
    if cfg.eval_images is not None and cfg.eval_images <= 0:
        raise ConfigError(f"eval_images={cfg.eval_images} must be a positive number of test "
                          f"images, or null for the whole test set")
    if cfg.device not in DEVICES:
        raise ConfigError(f"device={cfg.device} is unknown; use one of {', '.join(DEVICES)}")
    lr = cfg.optimizer.get("lr")
    if lr is None or not lr > 0:
        raise ConfigError(f"optimizer.lr={lr} must be a positive number")
    check_amp(cfg.amp)
    check_compile(cfg.compile)
    check_cuda_graph(cfg.cuda_graph)
    check_tta(cfg.tta)
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"label_smoothing={cfg.label_smoothing} must lie in [0, 1)")
    decay = cfg.ema.decay
    if decay is not None and not 0 <= decay < 1:
        raise ConfigError(f"ema.decay={decay} must lie in [0, 1), or be null to turn EMA off")
    if cfg.lookahead.every is not None and cfg.lookahead.every <= 0:
        raise ConfigError(f"lookahead.every={cfg.lookahead.every} must be a positive number "
                          f"of steps, or null to turn lookahead off")
    if not 0 <= cfg.lookahead.decay <= 1:
        raise ConfigError(f"lookahead.decay={cfg.lookahead.decay} must lie in [0, 1]")
    if cfg.lookahead.start_epochs < 0:
        raise ConfigError(f"lookahead.start_epochs={cfg.lookahead.start_epochs} must be >= 0")
    every = cfg.checkpoint.every
    if every is not None and every < 0:
        raise ConfigError(f"checkpoint.every={every} must be a number of steps, or 0 (or null) "
                          f"for a checkpoint only at the end")
    for key in ("flush_seconds", "system_metrics_seconds"):
        if cfg.tracking[key] < 0:
            raise ConfigError(f"tracking.{key}={cfg.tracking[key]} must be >= 0")
    resume = cfg.resume
    if not isinstance(resume, bool) and not (isinstance(resume, str) and resume):
        raise ConfigError(f"resume={resume} must be true, false, auto or the path of a "
                          f"checkpoint file")
    if not SEED_RANGE[0] <= cfg.seed < SEED_RANGE[1]:
        raise ConfigError(f"seed={cfg.seed} must lie in [-2**63, 2**64): torch's seeds are "
                          f"64-bit integers")
    check_experiment_name(cfg.tracking.experiment)
    check_paths(cfg)


PATH_KEYS = ("data.root", "data.manifest", "checkpoint.path", "resume", "tracking.uri")
NAME_MAX, PATH_MAX = 255, 4096  # bytes: what Linux file systems take


def check_paths(cfg: DictConfig) -> None:
    """Refuse a path no file system takes (a part over NAME_MAX bytes, or the whole over
    PATH_MAX), before anything tries to open it."""
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, str):
            continue
        path = value.removeprefix("sqlite:///") if key == "tracking.uri" else value
        parts = [len(part.encode()) for part in path.split("/")]
        if max(parts, default=0) > NAME_MAX or len(path.encode()) > PATH_MAX:
            raise ConfigError(f"{key}={value[:40]}... ({len(value)} characters) is not a path a "
                              f"file system takes (at most {NAME_MAX} bytes a name, "
                              f"{PATH_MAX} in all); shorten it")


def check_experiment_name(name: str) -> None:
    """Refuse an experiment name MLflow would refuse."""
    if not name.strip() or len(name) > MAX_EXPERIMENT_NAME_LENGTH:
        shown = repr(name) if len(name) <= 40 else f"{name[:20]!r}... ({len(name)} characters)"
        raise ConfigError(f"tracking.experiment={shown} must be a name of 1 to "
                          f"{MAX_EXPERIMENT_NAME_LENGTH} characters (MLflow's limit)")


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys the schema does not have (added with `+key=value`, which Hydra accepts
    anywhere): they would be silently ignored. The options of the model, optimizer,
    schedule and augmentation are checked against their builders instead."""
    schema = OmegaConf.structured(Config)
    for key in cfg:
        if key not in schema:
            raise ConfigError(f"{key} is not a config key (set with +{key}=...); the keys are "
                              f"listed by python -m cifar_exp.run --cfg job")
        section = schema[key]
        if isinstance(section, DictConfig) and key not in BUILDER_GROUPS:
            unknown = sorted(set(cfg[key]) - set(section))
            if unknown:
                raise ConfigError(f"{key}.{unknown[0]} is not a config key; the keys of "
                                  f"{key} are {', '.join(section)}")


def check_finite(config: object, path: str = "") -> None:
    """Refuse nan and inf anywhere in the config: no option means either."""
    if isinstance(config, float) and not math.isfinite(config):
        raise ConfigError(f"{path}={config} is not a finite number")
    if isinstance(config, dict):
        for key, value in config.items():
            check_finite(value, f"{path}.{key}" if path else str(key))
    elif isinstance(config, list):
        for index, value in enumerate(config):
            check_finite(value, f"{path}[{index}]")
