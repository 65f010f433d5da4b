"""One training step (forward, loss, backward, optimizer step) with the speed options
applied: mixed precision (`amp`, autocast over fp32 master weights), torch.compile, and the
whole step as CUDA graphs. Which options a run gets is decided in cifar_exp.speed."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifar_exp.models import regularization_loss
from cifar_exp.training import distributed
from cifar_exp.training.step_graph import BatchSource, StepGraphs

# The autocast dtype of each `amp` format (speed.AMP_FORMATS); None: plain fp32.
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU (a no-op on the CPU), e.g. before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of activations (and of the model's weights) for `channels_last`."""
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast(device: torch.device, amp: str,
             cache: bool = True) -> contextlib.AbstractContextManager[Any]:
    """Lower-precision compute for the `amp` format; the weights stay fp32. `cache=False`
    for CUDA graphs: a cached cast made outside the capture would not be replayed."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


class EagerStep:
    """The step op by op: what `TrainingStep` runs without CUDA graphs, and what its graphs
    capture. It holds no reference back to them, so a finished step's graphs (and their
    GPU memory) go the moment the step does, not at the next cycle collection."""

    def __init__(self, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, device: torch.device, amp: str,
                 label_smoothing: float, autocast_cache: bool) -> None:
        self.model, self.forward, self.optimizer, self.scaler = model, forward, optimizer, scaler
        self.device, self.amp = device, amp
        self.label_smoothing, self.autocast_cache = label_smoothing, autocast_cache

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        with autocast(self.device, self.amp, cache=self.autocast_cache):
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
                 device: torch.device, amp: str = "fp32", compile_mode: str = "none",
                 data_parallel: bool = False, label_smoothing: float = 0.0,
                 cuda_graph: bool = False) -> None:
        # Under torchrun the forward goes through DDP, whose backward averages gradients.
        forward = distributed.data_parallel(model, device) if data_parallel else model
        if compile_mode != "none":
            forward = torch.compile(forward, mode=compile_mode)
        # fp16 needs loss scaling to keep small gradients; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        # A cached autocast cast made outside a graph's capture would not be replayed.
        self.eager = EagerStep(model, forward, optimizer, self.scaler, device, amp,
                               label_smoothing, autocast_cache=not cuda_graph)
        self.graphs = StepGraphs(self.eager, optimizer, device) if cuda_graph else None

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """One step; the `frozen` parameters get no update (their gradients, already
        averaged over the ranks, are dropped, so the optimizer skips them)."""
        if self.graphs is not None:
            return self.graphs(inputs, labels, frozen)
        return self.eager(inputs, labels, frozen)

    def on_batch(self, batches: BatchSource, indices: torch.Tensor, epoch: int,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """One step on the batch `batches` makes of the drawn `indices`: with `cuda_graph`
        the making (gathering, augmentation) is replayed in the step's graph."""
        if self.graphs is not None:
            return self.graphs.on_batch(batches, indices, epoch, frozen)
        return self.eager(*batches(indices, epoch), frozen)
