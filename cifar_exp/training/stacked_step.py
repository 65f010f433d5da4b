"""One training step for several members at once: the members' weights stacked along a new
first dimension and their forward passes run as one batched (vmap) forward, so a small
network's step costs the launches of one step, not of N. Each member keeps its own model,
optimizer, loss settings and loss scaler: the stacked gradients are handed back to the
members' own parameters and each member's optimizer then steps alone, exactly as it would
without the others.

The members must share the network's architecture (the same model config) and the shapes of
their batches; everything else (seed, optimizer and its values, schedule, label smoothing,
augmentation) may differ. A member's result equals its result alone to float rounding: the
batched convolutions sum in another order than one member's (the tests bound the
difference)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from cifar_exp.models import regularization_loss
from cifar_exp.training.step import autocast


@dataclass
class Member:
    """What one member brings to a stacked step: its parts and this step's batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    label_smoothing: float
    inputs: torch.Tensor
    labels: torch.Tensor
    frozen: Sequence[torch.Tensor] = ()


class _WithPenalty(nn.Module):
    """The model's logits and its own penalty term (regularization_loss), both from the
    weights the functional call substitutes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(inputs)
        return logits, logits.new_zeros(()) + regularization_loss(self.model)


def signature(model: nn.Module) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    """The names, shapes and types of a model's weights and buffers: members can be stacked
    when theirs are equal."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return tuple((name, tuple(tensor.shape), tensor.dtype) for name, tensor in tensors)


def stacked_step(members: Sequence[Member], device: torch.device, amp: str) -> list[torch.Tensor]:
    """Train every member one step on its batch; returns each member's loss (detached)."""
    template = members[0].model
    wrapper = _WithPenalty(template)
    names = [name for name, _ in template.named_parameters()]
    buffer_names = [name for name, _ in template.named_buffers()]
    parameters = [dict(member.model.named_parameters()) for member in members]
    buffers = [dict(member.model.named_buffers()) for member in members]
    stacked = {f"model.{name}": torch.stack([own[name].detach() for own in parameters])
               .requires_grad_() for name in names}
    stacked_buffers = {f"model.{name}": torch.stack([own[name] for own in buffers])
                       for name in buffer_names}

    def forward(weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return functional_call(wrapper, {**weights, **state}, (inputs,))

    inputs = torch.stack([member.inputs for member in members])
    # autocast without its cache: the stacked weights are new tensors every step.
    with autocast(device, amp, cache=False):
        logits, penalties = vmap(forward, randomness="different")(stacked, stacked_buffers,
                                                                   inputs)
    losses = [F.cross_entropy(logits[index].float(), member.labels,
                              label_smoothing=member.label_smoothing) + penalties[index]
              for index, member in enumerate(members)]
    # Each member's loss reaches only its own slice of the stacked weights.
    total = torch.stack([member.scaler.scale(loss) for member, loss in zip(members, losses,
                                                                           strict=True)]).sum()
    total.backward()
    with torch.no_grad():
        for index, member in enumerate(members):
            frozen = {id(parameter) for parameter in member.frozen}
            member.optimizer.zero_grad(set_to_none=True)
            for name in names:
                parameter = parameters[index][name]
                if id(parameter) in frozen or not parameter.requires_grad:
                    continue
                # In the parameter's own layout (e.g. channels_last), as a lone step's is.
                parameter.grad = torch.empty_like(parameter).copy_(stacked[f"model.{name}"]
                                                                   .grad[index])
            for name in buffer_names:  # e.g. BatchNorm's running statistics
                buffers[index][name].copy_(stacked_buffers[f"model.{name}"][index])
    for member in members:
        member.scaler.step(member.optimizer)
        member.scaler.update()
    return [loss.detach() for loss in losses]
