"""One training step, from the indices the sampler drew to the optimizer's update: the
batch made of them (cifar_exp.training.batches), forward, loss, backward, optimizer step,
with the speed options applied: mixed precision (`amp`, autocast over fp32 master weights),
torch.compile, and the whole step, data path included, as CUDA graphs. Which options a run
gets is decided in cifar_exp.speed."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifar_exp.models import regularization_loss
from cifar_exp.training import distributed
from cifar_exp.training.batches import BatchMaker
from cifar_exp.training.step_graph import CaptureFailed, StepGraphs

log = logging.getLogger(__name__)

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
    """The model step op by op on a made batch: `eager(inputs, labels, frozen) -> loss`.
    What `TrainingStep` runs without CUDA graphs, and what its graphs capture. It holds no
    reference back to them, so a finished step's graphs (and their GPU memory) go the
    moment the step does, not at the next cycle collection."""

    def __init__(self, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, device: torch.device, *, amp: str,
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
    """The trainer's step: `step(indices, epoch, frozen) -> loss` trains on the batch its
    `batches` make of the drawn `indices` (in `epoch`); the loss is detached, still on the
    device (with `cuda_graph`, in the graph's memory until the next step). The `frozen`
    parameters get no update (their gradients, already averaged over the ranks, are
    dropped, so the optimizer skips them).

    With `cuda_graph` the making of the batch (gathering, augmentation) is replayed in the
    step's graph: only the indices are copied in. Should that data path not be capturable
    (an augmentation that reads the host, say), it runs op by op from then on, before the
    model step's own graph, with one warning; `batches_outside` says why."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, batches: BatchMaker,
                 device: torch.device, *, amp: str = "fp32", compile_mode: str = "none",
                 data_parallel: bool = False, label_smoothing: float = 0.0,
                 cuda_graph: bool = False) -> None:
        # Under torchrun the forward goes through DDP, whose backward averages gradients.
        forward = distributed.data_parallel(model, device) if data_parallel else model
        if compile_mode != "none":
            forward = torch.compile(forward, mode=compile_mode)
        # fp16 needs loss scaling to keep small gradients; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.batches = batches
        # A cached autocast cast made outside a graph's capture would not be replayed.
        self.eager = EagerStep(model, forward, optimizer, self.scaler, device, amp=amp,
                               label_smoothing=label_smoothing, autocast_cache=not cuda_graph)
        self.graphs = StepGraphs(optimizer, device) if cuda_graph else None
        self.batches_outside: str | None = None  # why the data path runs outside the graph

    def __call__(self, indices: torch.Tensor, epoch: int,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        graphs = self.graphs
        if graphs is None:
            return self.eager(*self.batches(indices, epoch), frozen)
        if self.batches_outside is None:
            try:
                return self._graphed_with_data_path(graphs, indices, epoch, frozen)
            except CaptureFailed as failed:
                self.batches_outside = str(failed)
                log.warning("the data path could not be captured in the step's CUDA graph "
                            "(%s); it runs op by op, the step still as a graph",
                            self.batches_outside)
        return self._graphed_alone(graphs, *self.batches(indices, epoch), frozen)

    # The graphed work closes over the eager step and the batches, never over this step:
    # no reference cycle keeps the graphs alive.
    def _graphed_with_data_path(self, graphs: StepGraphs, indices: torch.Tensor, epoch: int,
                                frozen: Sequence[torch.Tensor]) -> torch.Tensor:
        """The step with its data path: one graph per epoch key and frozen set."""
        eager, batches = self.eager, self.batches
        key = ("indices", batches.epoch_key(epoch), *(id(parameter) for parameter in frozen))
        return graphs(key, lambda drawn: eager(*batches(drawn, epoch), frozen), (indices,),
                      batches.generator)

    def _graphed_alone(self, graphs: StepGraphs, inputs: torch.Tensor, labels: torch.Tensor,
                       frozen: Sequence[torch.Tensor]) -> torch.Tensor:
        """The model step on a batch made op by op: one graph per frozen set."""
        eager = self.eager
        key = ("batch", *(id(parameter) for parameter in frozen))
        return graphs(key, lambda made, made_labels: eager(made, made_labels, frozen),
                      (inputs, labels))
