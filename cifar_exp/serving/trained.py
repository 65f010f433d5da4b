"""A trained model from where it was kept: an MLflow run (its config.yaml and final weights
among its artifacts) or a checkpoint file (its config and its parts' states). The network
is rebuilt from that config with the weights the run evaluates (the EMA copy when it
trained with one), beside the augmentation that feeds it, built over the training images
as in training."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cifar_exp.augment import Augmentation
from cifar_exp.config import RENAMED_KEYS, Config, dotlist_entry, validate
from cifar_exp.data import CifarData, load_cifar
from cifar_exp.errors import CheckpointError, ConfigError, one_line
from cifar_exp.job.checkpoint import load_checkpoint, read_tensors
from cifar_exp.speed import resolve_amp
from cifar_exp.tracking.store import check_tracking_uri, store_opening, use_client_defaults
from cifar_exp.training.build import build_network, resolve_device
from cifar_exp.training.step import memory_format

# What may differ from how the model was trained when it is scored or used: how and where,
# never what (a key outside these would not fit the weights).
EVALUATION_KEYS = ("eval_images", "eval_batch_size", "tta", "device", "amp", "channels_last",
                   "data.root", "data.download", "data.verify", "data.manifest",
                   "tracking.uri", "tracking.experiment")


@dataclass
class Trained:
    cfg: DictConfig  # as trained, with the evaluation keys given applied
    model: nn.Module  # on the device, in eval mode, with the evaluated weights
    augmentation: Augmentation
    data: CifarData  # on the device
    source: str  # where the weights came from: "run <id>" or a checkpoint's path
    run_id: str  # the run that trained them ("" when unknown)
    step: int  # the training step they are from
    amp: str  # the autocast format `amp` resolves to on the device


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> DictConfig:
    """`config` (a run's resolved config) with `key=value` overrides of EVALUATION_KEYS,
    typed and checked by the schema."""
    config = {RENAMED_KEYS.get(key, key): value for key, value in config.items()}
    for override in overrides:
        key = override.partition("=")[0]
        if "=" not in override or key not in EVALUATION_KEYS:
            raise ConfigError(f"{override}: give key=value with one of the keys that do not "
                              f"change the model: {', '.join(EVALUATION_KEYS)}")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), config,
                          OmegaConf.from_dotlist(list(overrides)))
    validate(cfg)
    return cfg


def from_run(run_id: str, uri: str, overrides: list[str]) -> Trained:
    """The model MLflow run `run_id` in the store at `uri` trained."""
    check_tracking_uri(uri, must_exist=True)
    use_client_defaults()
    client = MlflowClient(uri)
    try:
        with store_opening(uri):
            client.get_run(run_id)
    except MlflowException as error:
        raise ConfigError(f"no run {run_id} in {uri}; give the id of a training run (the "
                          f"MLflow UI shows it) or --checkpoint <file>") from error
    with tempfile.TemporaryDirectory() as folder:
        try:
            config = OmegaConf.to_container(OmegaConf.load(client.download_artifacts(
                run_id, "config.yaml", folder)))
            cfg = apply_overrides(config, [*overrides, dotlist_entry("tracking.uri", uri)])
            weights_file = "ema_weights.pt" if cfg.ema.decay is not None else "weights.pt"
            weights = read_tensors(Path(client.download_artifacts(run_id, weights_file,
                                                                  folder)),
                                   instead=f"score a checkpoint of run {run_id} instead "
                                           f"(--checkpoint <file>)")
        except (MlflowException, OSError) as error:
            raise ConfigError(f"run {run_id} has no config.yaml and final weights among its "
                              f"artifacts ({one_line(error, 160)}): it did not finish; "
                              f"score its checkpoint instead (--checkpoint <file>)") from error
    return _rebuilt(cfg, weights, f"run {run_id}", run_id, cfg.steps)


def from_checkpoint(path: Path, overrides: list[str]) -> Trained:
    """The model of checkpoint file `path`, at the step it was saved."""
    if not path.is_file():
        raise ConfigError(f"--checkpoint {path}: no such file; give a run's checkpoint.pt "
                          f"(in its run folder) or --run <MLflow run id>")
    state = load_checkpoint(path, instead="give another --checkpoint, or --run <run id>")
    cfg = apply_overrides(unflatten(state["config"]), overrides)
    states = state["states"]
    weights = states["ema"]["model"] if "ema" in states else states["model"]
    return _rebuilt(cfg, weights, str(path), state["tracking"]["run_id"], state["step"])


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a.b': 1} -> {'a': {'b': 1}}: a checkpoint keeps its config flat, as MLflow params."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def _rebuilt(cfg: DictConfig, weights: dict[str, torch.Tensor], source: str, run_id: str,
             step: int) -> Trained:
    device = resolve_device(cfg.device)
    data = load_cifar(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.verify,
                      cfg.data.manifest).to(device)
    augmentation, model = build_network(cfg, data)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as error:
        raise CheckpointError(f"the weights of {source} do not fit the model its config "
                              f"builds ({one_line(error)})") from error
    model.to(memory_format=memory_format(cfg.channels_last)).eval()
    return Trained(cfg, model, augmentation, data, source, run_id, step,
                   resolve_amp(cfg.amp, device))
