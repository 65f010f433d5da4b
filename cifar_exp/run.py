"""Hydra entry point: compose -> build -> train -> return the final precision.

    python -m cifar_exp.run [overrides]          one run
    python -m cifar_exp.run -m key=a,b [...]     a sweep, one MLflow run per job
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cifar_exp.augment import build_augmentation
from cifar_exp.config import register_schema, split_name, validate
from cifar_exp.data import load_cifar
from cifar_exp.ema import WeightAverage
from cifar_exp.errors import ConfigError, UserError
from cifar_exp.models import build_model
from cifar_exp.optim import build_optimizer
from cifar_exp.schedules import build_schedule
from cifar_exp.tracking import RunTracker, flatten, git_commit
from cifar_exp.train import TrainResult, TrainSettings, train

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent.parent

register_schema()


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


def run_name(cfg: DictConfig) -> str:
    """model-optimizer-steps, with the optimizer as chosen on the command line (sgd_decay)."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    model = choices.get("model", cfg.model.name)
    optimizer = choices.get("optimizer", cfg.optimizer.name)
    return f"{model}-{optimizer}-{cfg.steps}"


def run_experiment(cfg: DictConfig) -> TrainResult:
    """Build every part from `cfg`, train, and track the run in MLflow."""
    validate(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = load_cifar(cfg.data.name, cfg.data.root, cfg.data.download)
    if cfg.batch_size > data.train_labels.numel():
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the "
                          f"{data.train_labels.numel()} training images")
    data = data.to(device)

    augmentation_name, augmentation_options = split_name(cfg.augmentation)
    augmentation = build_augmentation(augmentation_name, data.train_images, **augmentation_options)
    model_name, model_options = split_name(cfg.model)
    model = build_model(model_name, data.num_classes, augmentation.image_size, **model_options)
    model = model.to(device)
    optimizer_name, optimizer_options = split_name(cfg.optimizer)
    optimizer = build_optimizer(optimizer_name, model.parameters(), **optimizer_options)
    schedule_name, schedule_options = split_name(cfg.schedule)
    steps_per_epoch = data.train_labels.numel() / cfg.batch_size
    scheduler = build_schedule(schedule_name, optimizer, cfg.steps, steps_per_epoch,
                               **schedule_options)
    ema = WeightAverage(model, cfg.ema.decay) if cfg.ema.decay is not None else None
    settings = TrainSettings(steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed,
                             log_every=cfg.log_every, eval_every=cfg.eval_every,
                             eval_batch_size=cfg.eval_batch_size,
                             channels_last=cfg.channels_last)

    tags = {"command": " ".join(["python -m cifar_exp.run", *sys.argv[1:]]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    commit = git_commit(PROJECT_ROOT)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    with RunTracker(cfg.tracking.uri, cfg.tracking.experiment, run_name(cfg), tags) as tracker:
        log.info("MLflow run %s (%s) in %s", tracker.run_id, run_name(cfg), cfg.tracking.uri)
        tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        if HydraConfig.initialized():
            overrides = HydraConfig.get().overrides.task
            tracker.log_text("\n".join(overrides) + "\n", "overrides.txt")
        result = train(model, optimizer, scheduler, augmentation, data, settings, tracker, ema)
        evaluated = ema.model if ema is not None else model
        tracker.log_state_dict(model, "weights.pt")
        if ema is not None:
            tracker.log_state_dict(ema.model, "ema_weights.pt")
        if cfg.tracking.log_model:
            tracker.log_model(evaluated, augmentation.eval(data.test_images[:8]))
    log.info("final precision @ 1 = %.4f (%.0f examples/sec, %.1f s training)",
             result.precision, result.examples_per_sec, result.train_seconds)
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run_experiment(cfg).precision
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
