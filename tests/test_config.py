"""Every config group option composes, type-checks and builds; bad values are refused."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from cifar_exp.config import (
    CONF_DIR,
    DEFAULT_TRACKING_URI,
    compose_config,
    key_table,
    schema_defaults,
    validate,
)
from cifar_exp.data import CifarData
from cifar_exp.errors import ConfigError
from cifar_exp.training.build import build_parts, resolve_device, select_gpu

GROUPS = ("model", "optimizer", "schedule", "augmentation", "data")


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def small_data(cifar10) -> CifarData:
    # As many training images as the largest recipe's batch (fast94_muon: 2000).
    return CifarData(cifar10.train_images[:2000], cifar10.train_labels[:2000],
                     cifar10.test_images[:64], cifar10.test_labels[:64], cifar10.classes)


def test_defaults_are_the_tf_tutorial_run():
    cfg = compose_config()
    assert cfg.model.name == "tf_cnn" and cfg.optimizer.name == "adam"
    assert cfg.optimizer.lr == 1e-3 and cfg.batch_size == 128 and cfg.steps == 3000
    assert cfg.augmentation.name == "tf_distort" and cfg.schedule.name == "constant"
    assert cfg.log_every == 10 and cfg.ema.decay is None
    assert cfg.tracking.uri == "sqlite:///mlflow.db"
    assert cfg.checkpoint.every == 1000 and cfg.checkpoint.path is None
    assert cfg.resume is False and cfg.data.verify is False and cfg.data.manifest is None


def test_the_default_run_takes_every_key_from_the_schema():
    # conf/config.yaml and the default groups change no schema key, so the defaults the
    # schema gives (and docs/configuration.md lists) are the default run's.
    composed = OmegaConf.to_container(compose_config(), resolve=False)
    defaults = schema_defaults()
    assert {key: functools.reduce(dict.__getitem__, key.split("."), composed)
            for key in defaults} == defaults
    assert defaults["tracking.uri"] == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"


def test_the_key_table_has_a_row_per_schema_key():
    rows = key_table()
    assert len(rows) == len(schema_defaults())
    assert "| `tracking.uri` | `sqlite:///mlflow.db` |" in rows
    assert "| `checkpoint.every` | 1000 |" in rows and "| `eval_images` | null |" in rows
    assert "| `data.root` | `${oc.env:CIFAR_EXP_DATA,./data}` |" in rows
    assert "| `lookahead.reset_each_epoch` | false |" in rows
    # The builder groups' keys are their options', listed with the groups.
    assert not any(row.startswith(("| `model", "| `optimizer", "| `schedule")) for row in rows)


@pytest.mark.parametrize("override,value", [
    ("resume=true", True), ("resume=false", False), ("resume=outputs/x/checkpoint.pt",
                                                     "outputs/x/checkpoint.pt")])
def test_resume_takes_a_flag_or_a_file(override, value):
    cfg = compose_config([override])
    validate(cfg)
    assert cfg.resume == value


def test_checkpoint_every_zero_or_null_is_accepted():
    for value, expected in (("0", 0), ("null", None)):
        cfg = compose_config([f"checkpoint.every={value}"])
        validate(cfg)
        assert cfg.checkpoint.every == expected


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_builds(group, option, small_data):
    cfg = compose_config([f"{group}={option}", "steps=5"])
    validate(cfg)
    if group == "data":
        assert cfg.data.name == option and cfg.data.root
        return
    parts = build_parts(cfg, small_data)
    x = parts.augmentation.train(small_data.train_images[:4], torch.Generator())
    assert parts.model(x).shape == (4, 10)
    assert parts.optimizer.defaults["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("option", options("experiment"))
def test_every_experiment_recipe_composes_and_builds(option, small_data):
    cfg = compose_config([f"+experiment={option}"])
    validate(cfg)
    assert cfg.tracking.experiment == option
    parts = build_parts(cfg, small_data)
    assert parts.settings.steps == cfg.steps


@pytest.mark.parametrize("option", options("experiment"))
def test_a_recipe_is_named_with_or_without_a_plus(option):
    assert compose_config([f"experiment={option}"]) == compose_config([f"+experiment={option}"])


def test_debug_quick_shortens_any_command():
    for recipe in ([], ["experiment=fast94"]):
        full, quick = compose_config(recipe), compose_config([*recipe, "debug=quick"])
        assert (quick.steps, quick.log_every, quick.eval_images) == (20, 5, 500)
        assert not quick.tracking.log_model and not quick.checkpoint.enabled
        assert quick.model == full.model and quick.batch_size == full.batch_size


@pytest.mark.parametrize("option", options("debug"))
def test_every_debug_option_composes_and_builds(option, small_data):
    cfg = compose_config([f"debug={option}"])
    validate(cfg)
    assert build_parts(cfg, small_data).settings.steps == cfg.steps


def test_data_options_take_the_schemas_defaults():
    cfg = compose_config(["data=cifar100"])
    assert cfg.data.name == "cifar100" and cfg.data.root == compose_config().data.root
    assert cfg.data.download is False and cfg.data.manifest is None


def test_sgd_decay_recipe_is_the_tutorials():
    cfg = compose_config(["+experiment=tf_tutorial_sgd_decay"])
    assert cfg.steps == 100_000 and cfg.optimizer.name == "sgd" and cfg.ema.decay == 0.9999
    assert cfg.schedule.name == "staircase"


def test_sgd_decay_selects_its_schedule_and_ema(small_data):
    cfg = compose_config(["optimizer=sgd_decay"])
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 0.1
    assert cfg.optimizer.momentum == 0.0
    assert cfg.schedule.name == "staircase" and cfg.schedule.every_epochs == 350
    assert cfg.ema.decay == 0.9999
    parts = build_parts(cfg, small_data)
    assert parts.ema is not None and parts.ema.decay == 0.9999
    # Its own keys can still be overridden from the command line.
    assert compose_config(["optimizer=sgd_decay", "ema.decay=0.99"]).ema.decay == 0.99


def test_fast94_recipe_is_airbench94s():
    cfg = compose_config(["+experiment=fast94"])
    assert cfg.model.name == "airbench" and cfg.augmentation.padding == 2
    assert cfg.augmentation.alternating_flip and cfg.schedule.name == "triangle"
    assert cfg.steps == 476 and cfg.batch_size == 1024 and cfg.label_smoothing == 0.2
    assert cfg.tta == "flip_translate" and cfg.optimizer.nesterov
    assert cfg.optimizer.momentum == 0.85 and cfg.optimizer.norm_lr_scale == 64
    # 11.5 and 0.0153 per 1024 examples of a summed loss, over 1 + 1 / (1 - 0.85).
    assert cfg.optimizer.lr == pytest.approx(11.5 / (1 + 1 / 0.15), rel=1e-4)
    assert cfg.optimizer.weight_decay == pytest.approx(0.0153 / (1 + 1 / 0.15), rel=1e-4)
    assert compose_config(["+experiment=fast94", "steps=50"]).steps == 50


def test_batch_scaled_values_follow_batch_size(small_data):
    cfg = compose_config(["+experiment=fast94", "batch_size=512"])
    assert cfg.optimizer.lr == pytest.approx(0.75)
    assert cfg.optimizer.weight_decay == pytest.approx(0.0019957 / 2)
    optimizer = build_parts(cfg, small_data).optimizer
    others, norms = optimizer.param_groups
    assert others["lr"] == pytest.approx(0.75 * 0.2)  # the triangle starts at 0.2 x lr
    assert norms["lr"] == pytest.approx(64 * 0.75 * 0.2)
    assert cfg.optimizer.lr == compose_config(["+experiment=fast94", "optimizer.lr=0.75"]
                                              ).optimizer.lr  # a plain value overrides it


def test_every_optimizer_has_lr():
    for option in options("optimizer"):
        assert compose_config([f"optimizer={option}"]).optimizer.lr > 0, option


def test_schema_rejects_wrong_types():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["steps=many"])
    assert isinstance(error.value.__cause__, ValidationError)


@pytest.mark.parametrize("override,message", [
    ("steps=0", "steps=0 must be a positive integer"),
    ("batch_size=-1", "batch_size=-1 must be a positive integer"),
    ("optimizer.lr=0", "optimizer.lr=0 must be a positive number"),
    ("device=tpu", "device=tpu is unknown"),
    ("ema.decay=1.0", r"ema.decay=1.0 must lie in \[0, 1\)"),
    ("lookahead.every=0", "lookahead.every=0 must be a positive number of steps, or null"),
    ("lookahead.decay=1.5", r"lookahead.decay=1.5 must lie in \[0, 1\]"),
    ("lookahead.start_epochs=-1", "lookahead.start_epochs=-1 must be >= 0"),
    ("amp=fp8", "amp=fp8 is unknown; use auto or one of fp32, bf16, fp16"),
    ("compile=fastest", "compile=fastest is unknown"),
    ("cuda_graph=sometimes", "cuda_graph=sometimes is unknown; use auto, true or false"),
    ("checkpoint.every=-1", r"checkpoint.every=-1 must be a number of steps, or 0 \(or null\)"),
    ("resume=3", "resume=3 must be true, false, auto or the path of a checkpoint file"),
    ("tracking.flush_seconds=-1", r"tracking.flush_seconds=-1.0 must be >= 0"),
    ("label_smoothing=1.0", r"label_smoothing=1.0 must lie in \[0, 1\)"),
    ("tta=mirror", "tta=mirror is unknown; use one of none, flip, flip_translate"),
    ("eval_images=0", "eval_images=0 must be a positive number of test images, or null"),
    ("optimizer.lr=inf", "optimizer.lr=inf is not a finite number"),
    ("ema.decay=nan", "ema.decay=nan is not a finite number"),
    ("seed=-9223372036854775809", r"seed=-9223372036854775809 must lie in \[-2\*\*63, 2\*\*64\)"),
    ("+data.colour=1", "data.colour is not a config key; the keys of data are name, root"),
    ("+foo=1", r"foo is not a config key \(set with \+foo=...\)"),
    ("tracking.experiment=" + "x" * 501, r"tracking.experiment='xxxxxxxxxxxxxxxxxxxx'... \(501 "
                                         r"characters\) must be a name of 1 to 500"),
    ("checkpoint.path=" + "c" * 300, r"checkpoint.path=c{40}... \(300 characters\) is not a "
                                     r"path a file system takes"),
    ("resume=" + "r/" * 2100, r"resume=(r/){20}... \(4200 characters\) is not a path"),
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config([override]))


def test_batch_larger_than_training_set_is_refused(small_data):
    with pytest.raises(ConfigError, match="batch_size=3000 exceeds the 2000 training images"):
        build_parts(compose_config(["batch_size=3000"]), small_data)


def test_unknown_builder_option_is_refused(small_data):
    with pytest.raises(ConfigError, match=r"model 'tf_cnn' has no option\(s\) \['width'\]"):
        build_parts(compose_config(["+model.width=3"]), small_data)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda but no CUDA GPU is visible"):
            resolve_device("cuda")


def test_sweep_jobs_take_the_visible_gpus_in_turn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert [resolve_device("auto", job) for job in range(4)] == [
        torch.device("cuda", index) for index in (0, 1, 2, 0)]
    assert resolve_device("cuda") == torch.device("cuda")  # a single run: the current GPU
    assert resolve_device("cpu", 5) == torch.device("cpu")


def test_only_a_numbered_gpu_is_selected(monkeypatch):
    # torch.cuda.set_device refuses a plain `cuda` (a single run), which broke every
    # single run on a GPU; sweep jobs and ranks get `cuda:N` and select it.
    selected = []
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    for device in (torch.device("cpu"), torch.device("cuda"), torch.device("cuda", 2)):
        select_gpu(device)
    assert selected == [torch.device("cuda", 2)]


@pytest.mark.parametrize("option", options("hparams_search"))
def test_every_search_space_composes_and_names_real_keys(option):
    cfg = compose_config([f"hparams_search={option}"], with_hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.seed is not None  # a search that can be repeated
    parsed = OverridesParser.create().parse_overrides(
        [f"{key}={value}" for key, value in sweeper.params.items()])
    for override in parsed:
        assert override.is_sweep_override(), override.input_line
        assert OmegaConf.select(cfg, override.key_or_group) is not None, override.key_or_group


def test_the_renamed_precision_key_names_its_new_name():
    with pytest.raises(ConfigError, match=r"precision=bf16: `precision` was renamed to `amp`; "
                                          r"write amp=bf16"):
        compose_config(["precision=bf16"])
    assert compose_config(["amp=bf16"]).amp == "bf16"


def test_the_schema_imports_nothing_that_trains():
    # A fresh interpreter: which project modules does importing the schema load?
    code = ("import sys, cifar_exp.config; "
            "print(sorted(m for m in sys.modules if m.startswith('cifar_exp')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert ast.literal_eval(loaded) == ["cifar_exp", "cifar_exp.callables", "cifar_exp.config",
                                        "cifar_exp.errors", "cifar_exp.speed"]


def test_the_experiment_name_limit_is_mlflows():
    from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH as mlflows

    from cifar_exp.config import MAX_EXPERIMENT_NAME_LENGTH
    assert mlflows == MAX_EXPERIMENT_NAME_LENGTH


@pytest.mark.parametrize("override,refused", [
    ("+hydra.job_logging.handlers.x.class=os.system", "hydra.job_logging.handlers.x.class"),
    ("+hydra.callbacks.x._target_=shutil.rmtree", "hydra.callbacks.x._target_"),
])
def test_a_config_naming_code_outside_the_project_is_refused(override, refused):
    # A log handler's class is called like a _target_: both are refused before Hydra
    # instantiates them.
    with pytest.raises(ConfigError, match=f"^{refused}=.* is not one of the .* the project "
                                          f"supports"):
        compose_config([override], with_hydra=True)
    compose_config(["+hydra.job_logging.handlers.x.class=logging.NullHandler"], with_hydra=True)


@pytest.mark.parametrize("option", options("hydra/launcher"))
def test_every_launcher_preset_composes_and_names_a_launcher_class(option):
    from hydra.plugins.launcher import Launcher
    from hydra.utils import get_class

    cfg = compose_config([f"hydra/launcher={option}"], with_hydra=True)
    assert issubclass(get_class(cfg.hydra.launcher._target_), Launcher)


def test_deleting_a_key_every_run_needs_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^~steps removes a key every run needs; give it a "
                                          r"value \(steps=\.\.\.\) or leave it out"):
        compose_config(["~steps"])


def test_an_output_folder_that_cannot_be_made_is_refused_and_nothing_is_made(tmp_path):
    (tmp_path / "a_file").write_text("")
    for folder, problem in ((tmp_path / "a_file" / "run", "a_file is not a folder"),
                            (Path("/proc/cifar_exp/run"), "no folder can be made in /proc")):
        with pytest.raises(ConfigError, match=f"^hydra.run.dir={folder} cannot be made: .*"
                                              f"{problem}"):
            compose_config([f"hydra.run.dir={folder}"])
    with pytest.raises(ConfigError, match="^hydra.sweep.dir=.* cannot be made"):
        compose_config(["hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path / 'a_file' / 's'}"])
    compose_config([f"hydra.run.dir={tmp_path / 'new' / 'run'}"])  # can be made: accepted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # the probe left nothing
