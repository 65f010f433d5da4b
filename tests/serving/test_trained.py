"""A trained model rebuilt from its run or its checkpoint."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from cifar_exp.config import compose_config
from cifar_exp.errors import CheckpointError, ConfigError
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


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.filterwarnings("error:Detected pickle protocol")  # nothing printed ahead of it
def test_a_run_whose_weights_would_run_code_is_refused_in_one_line(trained_run, store,
                                                                   tmp_path):
    """The weights of a run are read as a checkpoint is: tensors only, one line, the
    payload never run (a store is shared: its artifacts are not to be trusted more)."""
    source = MlflowClient(trained_run["uri"])
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("shared"))
    config = source.download_artifacts(trained_run["run_id"], "config.yaml", str(tmp_path))
    client.log_artifact(run.info.run_id, config)
    weights = tmp_path / "ema_weights.pt"  # the run trained with EMA: these are scored
    weights.write_bytes(pickle.dumps(RunsCode(tmp_path / "ran"), protocol=4))
    client.log_artifact(run.info.run_id, str(weights))
    with pytest.raises(CheckpointError) as error:
        trained.from_run(run.info.run_id, store, [])
    message = str(error.value)
    assert "refused to load (it names exec, code to call" in message or \
        "not a readable checkpoint" in message
    assert message.endswith(f"score a checkpoint of run {run.info.run_id} instead "
                            f"(--checkpoint <file>)")
    assert "\n" not in message and not (tmp_path / "ran").exists()
