"""A trained model rebuilt from its run or its checkpoint."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from cifar_exp.config import compose_config
from cifar_exp.errors import ConfigError
from cifar_exp.serving import trained


def test_a_flat_config_nests_again():
    assert trained.unflatten({"a.b": 1, "a.c.d": [1], "e": None}) == {
        "a": {"b": 1, "c": {"d": [1]}}, "e": None}


def test_only_keys_that_do_not_change_the_model_may_be_given():
    config = OmegaConf.to_container(compose_config(["steps=20"]))
    cfg = trained.apply_overrides(config, ["eval_images=100", "tta=flip"])
    assert (cfg.eval_images, cfg.tta, cfg.steps) == (100, "flip", 20)
    with pytest.raises(ConfigError, match="steps=5: give key=value with one of the keys"):
        trained.apply_overrides(config, ["steps=5"])


def test_a_config_written_before_the_amp_rename_still_reads():
    config = OmegaConf.to_container(compose_config())
    config["precision"] = config.pop("amp")
    config["precision"] = "fp32"
    assert trained.apply_overrides(config, []).amp == "fp32"


def test_the_checkpoint_and_the_run_give_the_same_ema_weights(trained_run, data_root):
    from_run = trained.from_run(trained_run["run_id"], trained_run["uri"],
                                [f"data.root={data_root}"])
    from_file = trained.from_checkpoint(trained_run["checkpoint"], [f"data.root={data_root}"])
    assert from_run.step == from_file.step == 20
    assert from_file.run_id == from_run.run_id == trained_run["run_id"]
    for (name, a), b in zip(from_run.model.state_dict().items(),
                            from_file.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    state = torch.load(trained_run["checkpoint"], weights_only=True)
    ema = state["states"]["ema"]["model"]
    assert all(torch.equal(from_file.model.state_dict()[k], v) for k, v in ema.items())
