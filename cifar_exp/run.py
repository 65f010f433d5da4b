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

from cifar_exp.build import build_experiment, resolve_device
from cifar_exp.config import register_schema, validate
from cifar_exp.data import load_cifar
from cifar_exp.errors import NonFiniteLoss, UserError
from cifar_exp.tracking import RunTracker, check_tracking_uri, flatten, git_tags
from cifar_exp.train import TrainResult, train

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent.parent

register_schema()
git_tags(PROJECT_ROOT)  # read once, when the code that will run is imported


def run_name(cfg: DictConfig) -> str:
    """model-optimizer-steps, with the optimizer as chosen on the command line (sgd_decay)."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    model = choices.get("model", cfg.model.name)
    optimizer = choices.get("optimizer", cfg.optimizer.name)
    return f"{model}-{optimizer}-{cfg.steps}"


def run_experiment(cfg: DictConfig) -> TrainResult:
    """Check `cfg`, load the data onto the device, build every part, train, and track the
    run in MLflow. Bad input fails before a run is opened, so none is left RUNNING."""
    validate(cfg)
    check_tracking_uri(cfg.tracking.uri)
    device = resolve_device(cfg.device)
    data = load_cifar(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.verify,
                      cfg.data.manifest).to(device)
    experiment = build_experiment(cfg, data)

    tags = {"command": " ".join(["python -m cifar_exp.run", *sys.argv[1:]]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            # What `auto` became on this device (the params hold the config as written).
            "precision": experiment.settings.precision,
            "compile": experiment.settings.compile,
            **git_tags(PROJECT_ROOT)}
    name = run_name(cfg)
    with RunTracker(cfg.tracking.uri, cfg.tracking.experiment, name, tags) as tracker:
        log.info("MLflow run %s (%s) in %s", tracker.run_id, name, cfg.tracking.uri)
        tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        if HydraConfig.initialized():
            tracker.log_text("\n".join(HydraConfig.get().overrides.task) + "\n",
                             "overrides.txt")
        result = train(experiment.model, experiment.optimizer, experiment.scheduler,
                       experiment.augmentation, data, experiment.settings, tracker,
                       experiment.ema)
        tracker.log_state_dict(experiment.model, "weights.pt")
        evaluated = experiment.model
        if experiment.ema is not None:
            evaluated = experiment.ema.model
            tracker.log_state_dict(evaluated, "ema_weights.pt")
        if cfg.tracking.log_model:
            tracker.log_model(evaluated, experiment.augmentation.eval(data.test_images[:8]))
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
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
