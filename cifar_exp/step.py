"""One training step (forward, loss, backward, optimizer step) with the speed options:
autocast precision over fp32 master weights, torch.compile, the whole step as CUDA graphs,
and the defaults per device."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifar_exp import distributed
from cifar_exp.errors import ConfigError
from cifar_exp.models import regularization_loss
from cifar_exp.step_graph import StepGraphs

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# reduce-overhead captures the compiled step in CUDA graphs (shapes here are static).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")
COMPILE_MODES_WITH_GRAPHS = ("reduce-overhead", "max-autotune")


def check_speed_names(precision: str, compile_mode: str) -> None:
    """Refuse unknown precision or compile names (before any work starts)."""
    if precision != "auto" and precision not in PRECISIONS:
        raise ConfigError(f"precision={precision} is unknown; use auto or one of "
                          f"{', '.join(PRECISIONS)}")
    if compile_mode != "auto" and compile_mode not in COMPILE_MODES:
        raise ConfigError(f"compile={compile_mode} is unknown; use auto or one of "
                          f"{', '.join(COMPILE_MODES)}")


def check_cuda_graph_setting(setting: object) -> None:
    """Refuse a `cuda_graph` value other than auto, true or false."""
    if not (setting == "auto" or isinstance(setting, bool)):
        raise ConfigError(f"cuda_graph={setting} is unknown; use auto, true or false")


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> bf16 autocast on a GPU (fp16 where bf16 is missing); fp32 on the CPU, where
    bf16 ran 1.4x faster but the 3,000-step run lost 0.6 points over 3 seeds (README)."""
    check_speed_names(name, "auto")
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    return name


def resolve_compile(mode: str, device: torch.device) -> str:
    """`auto` -> none: on the CPU compiling measured slower (and costs ~30 s up front)."""
    check_speed_names("auto", mode)
    return "none" if mode == "auto" else mode


def resolve_cuda_graph(setting: object, device: torch.device, precision: str,
                       compile_mode: str, fused_optimizer: bool, data_parallel: bool) -> bool:
    """Whether to replay the whole step as CUDA graphs. `auto` -> wherever the step can be
    captured and is not compiled; `true` where it cannot be captured is refused with the
    reason."""
    check_cuda_graph_setting(setting)
    obstacles = [reason for present, reason in (
        (device.type != "cuda", "it needs a CUDA GPU"),
        (not fused_optimizer, "it needs a fused optimizer (optimizer.fused=true), whose lr "
                              "can live on the GPU"),
        (precision == "fp16", "fp16's loss scaling reads the GPU each step; use "
                              "precision=bf16"),
        (compile_mode in COMPILE_MODES_WITH_GRAPHS, f"compile={compile_mode} makes its own "
                                                    f"CUDA graphs"),
        (data_parallel, "data-parallel steps are not captured")) if present]
    if setting == "auto":
        # Graphs around a torch.compile'd step are allowed with `true` but not yet measured
        # on a GPU, so `auto` leaves them out.
        return not obstacles and compile_mode == "none"
    if setting and obstacles:
        raise ConfigError(f"cuda_graph=true cannot work here: {obstacles[0]}; use "
                          f"cuda_graph=auto or false")
    return bool(setting)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU (a no-op on the CPU), e.g. before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of activations (and of the model's weights) for `channels_last`."""
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast(device: torch.device, precision: str,
             cache: bool = True) -> contextlib.AbstractContextManager[Any]:
    """Lower-precision compute for `precision`; the weights stay fp32. `cache=False` for
    CUDA graphs: a cached cast made outside the capture would not be replayed."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


class EagerStep:
    """The step op by op: what `TrainingStep` runs without CUDA graphs, and what its graphs
    capture. It holds no reference back to them, so a finished step's graphs (and their
    GPU memory) go the moment the step does, not at the next cycle collection."""

    def __init__(self, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, device: torch.device, precision: str,
                 label_smoothing: float, autocast_cache: bool) -> None:
        self.model, self.forward, self.optimizer, self.scaler = model, forward, optimizer, scaler
        self.device, self.precision = device, precision
        self.label_smoothing, self.autocast_cache = label_smoothing, autocast_cache

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        with autocast(self.device, self.precision, cache=self.autocast_cache):
            logits = self.forward(inputs)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        loss = loss + regularization_loss(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for parameter in frozen:
            parameter.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


class TrainingStep:
    """Callable `step(inputs, labels) -> loss` (detached, still on the device; with
    `cuda_graph`, in the graph's memory until the next step)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, precision: str = "fp32", compile_mode: str = "none",
                 data_parallel: bool = False, label_smoothing: float = 0.0,
                 cuda_graph: bool = False) -> None:
        # Under torchrun the forward goes through DDP, whose backward averages gradients.
        forward = distributed.data_parallel(model, device) if data_parallel else model
        if compile_mode != "none":
            forward = torch.compile(forward, mode=compile_mode)
        # fp16 needs loss scaling to keep small gradients; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        # A cached autocast cast made outside a graph's capture would not be replayed.
        self.eager = EagerStep(model, forward, optimizer, self.scaler, device, precision,
                               label_smoothing, autocast_cache=not cuda_graph)
        self.graphs = StepGraphs(self.eager, optimizer, device) if cuda_graph else None

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """One step; the `frozen` parameters get no update (their gradients, already
        averaged over the ranks, are dropped, so the optimizer skips them)."""
        if self.graphs is not None:
            return self.graphs(inputs, labels, frozen)
        return self.eager(inputs, labels, frozen)
