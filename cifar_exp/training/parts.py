"""The built parts of a run as one object (`Parts`): what the loop trains and what a
checkpoint saves, with the trainer's plain settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from cifar_exp.augment import Augmentation
from cifar_exp.training.ema import WeightAverage
from cifar_exp.training.lookahead import Lookahead


class Stateful(Protocol):
    """A part whose state a checkpoint saves and restores."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class TrainSettings:
    """The trainer's plain settings, every value from the config (training.build fills
    them; the config schema, cifar_exp.config.Config, holds their defaults and meaning)."""

    steps: int
    batch_size: int
    seed: int
    log_every: int
    eval_every: int
    eval_batch_size: int
    channels_last: bool
    amp: str  # resolved: fp32 | bf16 | fp16
    compile: str  # resolved: a torch.compile mode, or none
    cuda_graph: bool  # resolved
    label_smoothing: float
    tta: str
    progress: bool  # a progress bar (the main process of a job that owns its console)


# The optional parts: how a message names each, and the config option that turns it on.
OPTIONAL_PARTS = {"ema": ("EMA", "ema.decay"), "lookahead": ("lookahead", "lookahead.every")}


@dataclass
class Parts:
    """The built parts of a run as one object: what the loop trains and what a checkpoint
    saves. EMA and lookahead are None when the config turns them off."""

    augmentation: Augmentation
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    settings: TrainSettings
    ema: WeightAverage | None = None
    lookahead: Lookahead | None = None

    def states(self) -> dict[str, Stateful]:
        """The parts that carry state, by name, absent ones left out: model, optimizer,
        scheduler, and ema and lookahead where present."""
        parts = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                 "ema": self.ema, "lookahead": self.lookahead}
        return {name: part for name, part in parts.items() if part is not None}

    @property
    def evaluated(self) -> nn.Module:
        """The model that is scored and logged: the EMA copy when there is one."""
        return self.ema.model if self.ema is not None else self.model
