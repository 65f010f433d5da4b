"""The whole training step (forward, loss, backward, optimizer step) replayed as CUDA
graphs: one launch a step instead of one per kernel, for small networks whose steps on a
GPU are bound by kernel launches, not by the GPU's arithmetic.

A graph replays fixed memory: each step copies its batch into the graph's input buffers and
its learning rates into device tensors that the fused optimizer reads, so schedules go on
working. A change of the frozen parameters (e.g. airbench's whitening bias after its first
epochs) captures a new graph."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

# Eager steps, on a side stream, before the first capture: they initialize what is made
# lazily (optimizer state, cuDNN's algorithm choice, autograd's buffers). They train.
WARMUP_STEPS = 3

Step = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor
    labels: torch.Tensor
    loss: torch.Tensor


class StepGraphs:
    """Callable like the step it wraps: `graphs(inputs, labels, frozen) -> loss`. The loss
    returned lives in the graph's memory: the next step overwrites it, so copy it (as the
    trainer does) before the next call."""

    def __init__(self, step: Step, optimizer: torch.optim.Optimizer,
                 device: torch.device) -> None:
        self.step, self.device = step, device
        self.lrs = DeviceLearningRates(optimizer, device)
        self.eager_steps = 0
        self._captured: dict[tuple[int, ...], _Captured] = {}

    @property
    def captures(self) -> int:
        """How many graphs were captured so far (one per set of frozen parameters)."""
        return len(self._captured)

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        if self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            return self._on_side_stream(lambda: self.step(inputs, labels, frozen))
        key = tuple(id(parameter) for parameter in frozen)
        captured = self._captured.get(key)
        if captured is None:
            captured = self._captured[key] = self._capture(inputs, labels, frozen)
        self.lrs.refill()
        captured.inputs.copy_(inputs)
        captured.labels.copy_(labels)
        captured.graph.replay()
        return captured.loss

    def _on_side_stream(self, work: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            result = work()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return result

    def _capture(self, inputs: torch.Tensor, labels: torch.Tensor,
                 frozen: Sequence[torch.Tensor]) -> _Captured:
        """Record one step on copies of this batch. Capturing runs nothing: the caller's
        replay then does this step's work."""
        static_inputs, static_labels = inputs.clone(), labels.clone()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a DataLoader's pinning thread) may go on using CUDA.
        with self.lrs.installed(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            loss = self.step(static_inputs, static_labels, frozen)
        return _Captured(graph, static_inputs, static_labels, loss)


class DeviceLearningRates:
    """Learning rates in device tensors, for a fused optimizer inside a CUDA graph: the
    graph reads them, `refill` copies the schedule's current floats into them."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.optimizer = optimizer
        self.tensors = [torch.zeros((), device=device) for _ in optimizer.param_groups]
        self._values: list[float | None] = [None] * len(self.tensors)

    def refill(self) -> None:
        """Copy each group's lr into its tensor: a fill only where the value changed."""
        for index, group in enumerate(self.optimizer.param_groups):
            value = float(group["lr"])
            if value != self._values[index]:
                self.tensors[index].fill_(value)
                self._values[index] = value

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Inside, the optimizer's groups hold the tensors as their lr and declare
        themselves capturable (Adam checks that before a capture); after, their floats."""
        groups = self.optimizer.param_groups
        saved = [(group["lr"], group.get("capturable")) for group in groups]
        for group, tensor in zip(groups, self.tensors, strict=True):
            group["lr"] = tensor
            if "capturable" in group:
                group["capturable"] = True
        try:
            yield
        finally:
            for group, (lr, capturable) in zip(groups, saved, strict=True):
                group["lr"] = lr
                if capturable is not None:
                    group["capturable"] = capturable
