"""The whole training step (forward, loss, backward, optimizer step) replayed as CUDA
graphs: one launch a step instead of one per kernel, for small networks whose steps on a
GPU are bound by kernel launches, not by the GPU's arithmetic.

A graph replays fixed memory: each call copies its tensor arguments into the graph's input
buffers and the learning rates into device tensors that the fused optimizer reads, so
schedules go on working. What is graphed is any function of tensors that ends in an
optimizer step (cifar_exp.training.step composes the trainer's: the data path and the model
step, from drawn indices). A generator the function draws from is registered with its graph,
so each replay draws new numbers, the ones the same calls run op by op would draw. The
caller says which graph a call replays (a key): e.g. a change of the frozen parameters
captures a new one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import torch

# Eager steps, on a side stream, before the first capture: they initialize what is made
# lazily (optimizer state, cuDNN's algorithm choice, autograd's buffers). They train.
WARMUP_STEPS = 3

# Graphs kept at once (each holds its own activation memory): a new one beyond this drops
# the oldest. Built-in recipes need at most 4 (frozen or not, even or odd epoch).
MAX_GRAPHS = 4

# What a graph records: a function of tensors that returns the loss.
GraphedWork = Callable[..., torch.Tensor]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    arguments: tuple[torch.Tensor, ...]  # the buffers each replay reads its arguments from
    loss: torch.Tensor


class CaptureFailed(RuntimeError):
    """The capture of a graph failed (the cause says why); nothing was replayed."""


class StepGraphs:
    """`graphs(key, work, arguments, generator) -> work(*arguments)`: run op by op for the
    first WARMUP_STEPS calls, then replayed from the graph kept for `key`, captured the
    first time the key comes. The loss returned lives in the graph's memory: the next call
    overwrites it, so copy it (as the trainer does) before then."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.device = device
        self.lrs = DeviceLearningRates(optimizer, device)
        self.eager_steps = 0
        self._captured: dict[Hashable, _Captured] = {}
        self.captures = 0  # graphs captured so far (one per key kept)

    def __call__(self, key: Hashable, work: GraphedWork, arguments: tuple[torch.Tensor, ...],
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """`work(*arguments)`. `work` must do the same for every call with this `key` (it
        is recorded once); `generator`, if it draws from one, is registered with its graph.
        A capture that fails raises CaptureFailed."""
        if self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            return self._on_side_stream(lambda: work(*arguments))
        captured = self._captured.get(key)
        if captured is None:
            if len(self._captured) >= MAX_GRAPHS:  # the oldest goes, with its memory
                del self._captured[next(iter(self._captured))]
            try:
                captured = self._capture(arguments, work, generator)
            except RuntimeError as error:
                raise CaptureFailed(str(error)) from error
            self._captured[key] = captured
            self.captures += 1
        self.lrs.refill()
        for buffer, argument in zip(captured.arguments, arguments, strict=True):
            buffer.copy_(argument)
        captured.graph.replay()
        return captured.loss

    def _on_side_stream(self, work: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            result = work()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return result

    def _capture(self, arguments: tuple[torch.Tensor, ...], work: GraphedWork,
                 generator: torch.Generator | None) -> _Captured:
        """Record `work` on copies of `arguments`. Capturing runs nothing: the caller's
        replay then does this step's work. A `generator` the work draws from is registered:
        each replay then advances it as the same work run op by op would."""
        buffers = tuple(argument.clone() for argument in arguments)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        # thread_local: other threads (a DataLoader's pinning thread) may go on using CUDA.
        with self.lrs.installed(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            loss = work(*buffers)
        return _Captured(graph, buffers, loss)


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
