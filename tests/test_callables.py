"""A config names code only where Hydra or logging calls it, and only the objects each slot
admits: payloads of every kind that would create a marker file (kept in
experiments/hostile_inputs.py, which runs them too) are refused in one line, before anything
runs, whether they come from a recipe file or from the command line."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from omegaconf import OmegaConf

from cifar_exp.callables import check_callables
from cifar_exp.config import compose_config
from cifar_exp.errors import ConfigError
from tests.conftest import REPO, cli


def hostile_inputs():
    """experiments/hostile_inputs.py, whose payloads these tests run."""
    spec = importlib.util.spec_from_file_location("hostile_inputs",
                                                  REPO / "experiments" / "hostile_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hostile_inputs"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


HOSTILE = hostile_inputs()

@pytest.mark.parametrize("name", HOSTILE.CODE_PAYLOADS)
def test_a_recipe_naming_code_is_refused_in_one_line_before_anything_runs(tmp_path,
                                                                          data_root, name):
    HOSTILE.code_recipe(name)(tmp_path)
    for sweep in ((), ("-m",)):
        result = cli(tmp_path, *sweep, "--config-dir", str(tmp_path / "conf"),
                     "experiment=evil", "debug=quick", data_root=data_root)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: hydra.") and line.endswith("remove it") or \
            "only under the job's folder" in line, line
        assert not (tmp_path / "marker").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]  # nothing made


@pytest.mark.parametrize("override", [
    "+hydra.callbacks.x._target_=logging.os.system",
    "+hydra.job_logging.handlers.x.class=logging.os.system",
    "hydra.job_logging.handlers.file.filename=/tmp/elsewhere.log",
    "hydra.job_logging.handlers.file.filename=${hydra.runtime.output_dir}/../escaped.log",
    "+model._target_=os.system",
])
def test_an_override_naming_code_is_refused(override):
    with pytest.raises(ConfigError, match=r"may not run other code|only under the job's"):
        compose_config([override], with_hydra=True)


@pytest.mark.parametrize("overrides", [
    [], ["hydra/launcher=joblib"], ["hydra/launcher=packed"], ["hydra/launcher=submitit_local"],
    ["hydra/launcher=slurm"], ["hydra/launcher=ray"], ["hparams_search=tf_cnn_optuna"],
    ["hydra/job_logging=stdout"], ["hydra/job_logging=disabled"],
    ["+hydra.job_logging.handlers.x.class=logging.NullHandler"],
    ["hydra.job_logging.handlers.file.filename=${hydra.runtime.output_dir}/logs/train.log"],
    ["+hydra.callbacks.log._target_=hydra.experimental.callbacks.LogJobReturnCallback"],
])
def test_what_the_project_ships_and_supports_is_admitted(overrides):
    compose_config(overrides, with_hydra=True)


def test_a_class_is_admitted_by_what_its_name_locates():
    # A config saved before the package moved names the sweep callback by its old path.
    check_callables(OmegaConf.create(
        {"hydra": {"callbacks": {"sweep": {"_target_": "cifar_exp.sweep.SweepTracking"}}}}))
    with pytest.raises(ConfigError, match="not one of the Hydra callbacks"):
        check_callables(OmegaConf.create(
            {"hydra": {"callbacks": {"x": {"_target_": "cifar_exp.config.os.system"}}}}))
