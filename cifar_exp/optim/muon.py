"""Muon on the convolution filters, SGD on the rest, as one optimizer: the split of Keller
Jordan's airbench94_muon, with torch.optim.Muon's update made capturable in a CUDA graph.

Each filter (out x in x kh x kw) is updated as an out x (in * kh * kw) matrix: a 2-D copy,
refreshed from the filter before each step and written back after, held by a
`torch.optim.Muon` that keeps its state (the momentum buffers, keyed to the copies) and its
checkpoint format. The copies make the layout of the filters (channels_last or not) and
their replacement by `.to()` or by a checkpoint's weights irrelevant. Linear layers (2-D),
biases, normalization layers and anything else train with torch's SGD, as airbench94_muon
trains its head and biases.

The step is ours, not torch's Muon.step (which reads its lr back to the host): the same
operations in the same order (so the same numbers, bit for bit, for fp32 parameters and a
float lr), all of them tensor work with no host sync, and an lr that may be a device
tensor. With
`fused=true` SGD's fused kernel trains the rest, which reads its lr from a device tensor
too, so the whole step can be captured: cifar_exp.training.step_graph installs device
lrs into every group, ours included, and `cuda_graph=auto` turns on (cifar_exp.speed)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from cifar_exp.errors import ConfigError
from cifar_exp.optim import OPTIMIZERS
from cifar_exp.optim.groups import scaled_groups


def orthogonalized(update: torch.Tensor, coefficients: tuple[float, float, float],
                   steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz iteration, op for op: `update` scaled to a spectral
    norm of at most 1, then `steps` quintic iterations with `coefficients` (a, b, c), in
    bf16. Tensor work only: the shapes choose the orientation, no value is read back."""
    a, b, c = coefficients
    tall = update.size(0) > update.size(1)
    x = update.bfloat16()
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)  # not in place: a bf16 `update` is the caller's
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's lr adjustment for a rows x columns matrix."""
    rows, columns = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / columns))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / columns)
    return 1.0


def muon_update(param: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor,
                group: dict[str, Any]) -> None:
    """One Muon step of the 2-D `param` (torch.optim.Muon's): the momentum `buffer` moves
    toward `grad`, the (Nesterov) update is orthogonalized, the weight decays (decoupled)
    and the update is taken at the adjusted lr. The group's lr (and momentum) may be floats
    or device tensors (under a CUDA graph); nothing is read back to the host."""
    lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
    buffer.lerp_(grad, 1 - momentum)
    update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
    update = orthogonalized(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
    ratio = lr_ratio(group["adjust_lr_fn"], param.shape)
    if isinstance(lr, torch.Tensor):
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        # addcmul works in the param's fp32 as add_(alpha=-lr) does (not bf16's update * lr).
        param.addcmul_(update, lr if ratio == 1 else lr * ratio, value=-1)
    else:  # torch's own operations, for the same bits
        param.mul_(1 - lr * weight_decay)
        param.add_(update, alpha=-(lr * ratio))


class MuonSGD(torch.optim.Optimizer):
    """One optimizer over Muon for `filters` (every tensor of 3 or more dimensions,
    flattened to 2-D; torch.optim.Muon's update, our step) and `torch.optim.SGD` for the
    `rest`.

    `param_groups` is the Muon group (holding the filters themselves) followed by SGD's
    groups, so schedules, the logged lr (group 0: Muon's), gradient scaling and a CUDA
    graph's device lrs see every parameter. With `normalize_filters`, each filter is
    rescaled to a Frobenius norm of sqrt(its output channels) before its update, as
    airbench94_muon does; the function of a conv followed by BatchNorm does not change, the
    relative size of the update does."""

    def __init__(self, filters: list[torch.Tensor], muon_options: dict[str, Any],
                 rest: list[dict[str, Any]], sgd_options: dict[str, Any],
                 normalize_filters: bool = False) -> None:
        self.filters = filters
        self.normalize_filters = normalize_filters
        self._matrices = [torch.zeros(p.shape[0], p[0].numel(), dtype=p.dtype, device=p.device)
                          for p in filters]
        # Holds the Muon state and group, and writes and reads their checkpoint; never steps.
        self.muon = torch.optim.Muon(self._matrices, **muon_options)
        self._make_momentum_buffers()
        self.sgd = torch.optim.SGD(rest, **sgd_options) if rest else None
        muon_group = {"params": list(filters), **self._muon_settings()}
        sgd_groups = self.sgd.param_groups if self.sgd is not None else []
        # The base class appends these very dicts: SGD's groups are shared, not copied.
        super().__init__([muon_group, *sgd_groups],
                         {"lr": muon_options["lr"], "momentum": muon_options["momentum"]})

    def _muon_settings(self) -> dict[str, Any]:
        return {key: value for key, value in self.muon.param_groups[0].items()
                if key != "params"}

    def _sync_muon(self) -> None:
        """Give torch's Muon group the values a schedule set on ours (lr, momentum, ...)."""
        inner = self.muon.param_groups[0]
        inner.update({key: value for key, value in self.param_groups[0].items()
                      if key != "params"})

    def _make_momentum_buffers(self) -> None:
        """Zero buffers where there are none (a new optimizer, a checkpoint saved before its
        first step): made here, never in a step that a CUDA graph might capture, whose
        zeros would then be replayed each step."""
        for matrix in self._matrices:
            self.muon.state[matrix].setdefault("momentum_buffer", torch.zeros_like(matrix))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        for filt, matrix in zip(self.filters, self._matrices, strict=True):
            if filt.grad is None:  # frozen this step, or unused
                continue
            matrix.view(filt.shape).copy_(filt)
            if self.normalize_filters:
                matrix.mul_(math.sqrt(matrix.shape[0]) / matrix.norm().clamp(min=1e-12))
            muon_update(matrix, filt.grad.reshape(matrix.shape),
                        self.muon.state[matrix]["momentum_buffer"], group)
            filt.copy_(matrix.view(filt.shape))
        if self.sgd is not None:
            self.sgd.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        self._sync_muon()  # the group's lr is the schedule's next one, not the last used
        return {"muon": self.muon.state_dict(),
                "sgd": self.sgd.state_dict() if self.sgd is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "sgd"} or (state_dict["sgd"] is None) != (self.sgd is None):
            raise ValueError("optimizer state is not that of a muon optimizer over the same "
                             "parameters")
        self.muon.load_state_dict(state_dict["muon"])
        self._make_momentum_buffers()
        self.param_groups[0].update(self._muon_settings())
        if self.sgd is not None:
            kernels = {key: self.sgd.param_groups[0][key] for key in ("fused", "foreach")}
            self.sgd.load_state_dict(state_dict["sgd"])
            # torch would take the writer's kernels (a checkpoint from before muon could be
            # fused has fused=false, which cannot be captured): this run's decide.
            for group in self.sgd.param_groups:
                group.update(kernels)
            # torch's load_state_dict makes new group dicts: share them again.
            self.param_groups[1:] = self.sgd.param_groups


def split_parameters(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]]
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(filters, matrices, vectors): the trainable tensors of 3 or more dimensions outside
    normalization layers (the conv filters, for Muon); the other tensors of 2 or more
    dimensions (linear layers); and the rest (biases, and every parameter of a group marked
    `normalization`)."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    filters, matrices, vectors = [], [], []
    for group in groups:
        norm = group.get("normalization", False)
        for p in group["params"]:
            if not p.requires_grad:
                continue
            if norm or p.ndim < 2:
                vectors.append(p)
            else:
                (filters if p.ndim > 2 else matrices).append(p)
    return filters, matrices, vectors


@OPTIMIZERS.register("muon")
def muon(params, *, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
         weight_decay: float = 0.0, ns_steps: int = 5,
         ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
         eps: float = 1e-7, adjust_lr_fn: str | None = None, normalize_filters: bool = False,
         sgd_lr: float = 0.1, sgd_bias_lr: float | None = None, sgd_momentum: float = 0.9,
         sgd_nesterov: bool = True, sgd_weight_decay: float = 0.0,
         sgd_decoupled_weight_decay: bool = False, fused: bool | None = False,
         foreach: bool | None = None) -> MuonSGD:
    """Muon (lr, momentum, ..., weight_decay: torch.optim.Muon's, decoupled) on the conv
    filters; SGD on linear layers (`sgd_lr`) and on biases and normalization layers
    (`sgd_bias_lr`, default `sgd_lr`), with `sgd_weight_decay` as the sgd option's
    `weight_decay` (`sgd_decoupled_weight_decay`: the decay term of a step at the peak lr,
    the same for every group). `fused` and `foreach` are SGD's; with `fused=true` the whole
    step reads its lrs from device tensors, so `cuda_graph` can capture it (the Muon update
    can be captured either way)."""
    if fused and foreach:
        raise ConfigError("optimizer.fused=true and optimizer.foreach=true cannot both be set "
                          "(muon's SGD takes one kernel); set optimizer.foreach=null, or "
                          "optimizer.fused=false")
    if not 1 <= ns_steps < 100:
        raise ConfigError(f"optimizer.ns_steps={ns_steps} must lie in [1, 99] (torch's Muon)")
    if len(ns_coefficients) != 3:
        raise ConfigError(f"optimizer.ns_coefficients={list(ns_coefficients)} must be three "
                          f"numbers (a, b, c)")
    filters, matrices, vectors = split_parameters(params)
    if not filters:
        raise ConfigError("optimizer muon found no convolution filters (parameters of 3 or "
                          "more dimensions) for Muon in this model; use another optimizer")
    bias_lr = sgd_lr if sgd_bias_lr is None else sgd_bias_lr
    if sgd_lr <= 0 or bias_lr <= 0:
        raise ConfigError(f"optimizer.sgd_lr={sgd_lr} and optimizer.sgd_bias_lr={sgd_bias_lr} "
                          f"must be positive")
    rest = [{"params": tensors, "lr": group_lr} for tensors, group_lr in
            ((matrices, sgd_lr), (vectors, bias_lr)) if tensors]
    rest = scaled_groups(rest, sgd_lr, sgd_weight_decay,
                         decoupled_weight_decay=sgd_decoupled_weight_decay) if rest else []
    muon_options = {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                    "weight_decay": weight_decay, "ns_steps": ns_steps,
                    "ns_coefficients": tuple(float(c) for c in ns_coefficients), "eps": eps,
                    "adjust_lr_fn": adjust_lr_fn}
    sgd_options = {"lr": sgd_lr, "momentum": sgd_momentum, "nesterov": sgd_nesterov,
                   "fused": fused, "foreach": foreach}
    return MuonSGD(filters, muon_options, rest, sgd_options, normalize_filters)
