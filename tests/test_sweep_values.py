"""Each value of a sweep checked before the sweep starts (cifar_exp.sweep_values)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cifar_exp.config import CONF_DIR, register_schema
from cifar_exp.errors import ConfigError, DataError
from cifar_exp.run import check_builders
from cifar_exp.sweep_values import check_sweep_values


def check(*overrides: str) -> None:
    """check_sweep_values as the command calls it: on the config Hydra composes for a
    multirun (swept keys left at their defaults), with Hydra's config groups and the
    builders' check."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        fixed = [override for override in overrides if "," not in override
                 and "range(" not in override and "interval(" not in override]
        cfg = compose("config", overrides=fixed, return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        check_sweep_values(cfg, overrides, loader.get_group_options, check_builders)


def test_a_sweep_of_good_values_passes(data_root):
    check(f"data.root={data_root}", "seed=range(0,3)", "optimizer=adam,sgd",
          "optimizer.lr=0.1,0.01", "hydra/launcher=basic,joblib")


@pytest.mark.parametrize("swept,message", [
    ("seed=1,abc", "seed=abc: Value 'abc' of type 'str' could not be converted to Integer; "
                   "give seed a value of its type"),
    ("steps=5,0", "steps=0 must be a positive integer"),
    ("optimizer.lr=0.1,-1", "optimizer.lr=-1 must be a positive number"),
    ("optimizer=adam,adamx", "optimizer=adamx: there is no such option; choose one of adam, "
                             "adamw, muon, sgd, sgd_decay"),
    ("eval_images=100,null,0", "eval_images=0 must be a positive number of test images"),
    ("optimizer.eps=1e-8,-1", "optimizer 'adam' refused its options (Invalid epsilon value: "
                              "-1); fix the optimizer.* values"),
])
def test_the_first_bad_value_is_refused_in_one_line(data_root, swept, message):
    with pytest.raises(ConfigError) as error:
        check(f"data.root={data_root}", swept)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_a_fixed_value_that_cannot_work_is_refused_too(data_root):
    with pytest.raises(ConfigError, match=r"^steps=0 must be a positive integer"):
        check(f"data.root={data_root}", "steps=0", "seed=1,2")


def test_the_data_is_looked_for_where_each_job_will_look(data_root, tmp_path):
    check("data.root=/nowhere", f"data.root={data_root},{data_root}")  # swept: base not read
    with pytest.raises(DataError, match=f"not found: .* in {tmp_path}"):
        check(f"data.root={data_root},{tmp_path}")
    with pytest.raises(DataError, match=f"not found: .* in {tmp_path}"):
        check(f"data.root={tmp_path}", "seed=1,2")


def test_a_swept_group_leaves_its_options_to_each_jobs_builders(data_root):
    # adamw and sgd: the base config holds adam, whose builder need not take these.
    check(f"data.root={data_root}", "optimizer=adamw,sgd", "optimizer.weight_decay=0,0.1")


def test_a_search_space_is_left_to_the_sweeper(data_root):
    check(f"data.root={data_root}", "optimizer.lr=interval(0.001,0.1)")
