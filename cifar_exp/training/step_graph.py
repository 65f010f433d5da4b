"""The whole training step (forward, loss, backward, optimizer step) replayed as CUDA
graphs: one launch a step instead of one per kernel, for small networks whose steps on a
GPU are bound by kernel launches, not by the GPU's arithmetic.

A graph replays fixed memory: each step copies its batch into the graph's input buffers and
its learning rates into device tensors that the fused optimizer reads, so schedules go on
working. The trainer's steps (`on_batch`) capture the data path too: the graph takes the
drawn indices and does the gathering and the augmentation's random draws itself (the
training generator is registered with the graph, so each replay draws new numbers, the
ones the same steps run op by op would draw). A change of the frozen parameters (e.g.
airbench's whitening bias after its first epochs), or of what the augmentation does with
the epoch, captures a new graph."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)

# Eager steps, on a side stream, before the first capture: they initialize what is made
# lazily (optimizer state, cuDNN's algorithm choice, autograd's buffers). They train.
WARMUP_STEPS = 3

# Graphs kept at once (each holds its own activation memory): a new one beyond this drops
# the oldest. Built-in recipes need at most 4 (frozen or not, even or odd epoch).
MAX_GRAPHS = 4

Step = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


class BatchSource(Protocol):
    """Makes a step's inputs and labels from drawn indices (training.batches.BatchMaker)."""

    generator: torch.Generator

    def __call__(self, indices: torch.Tensor,
                 epoch: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def epoch_key(self, epoch: int) -> int: ...


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    arguments: tuple[torch.Tensor, ...]  # the buffers each replay reads its arguments from
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
        self._captured: dict[Hashable, _Captured] = {}
        self.captures = 0  # graphs captured so far (one per set of frozen parameters, ...)
        # Why the data path runs outside the graph (its capture failed); None: it is inside.
        self.batches_outside: str | None = None

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """A step on this batch (copied into the graph's buffers)."""
        key = ("batch", *(id(parameter) for parameter in frozen))
        return self._run(key, (inputs, labels),
                         lambda batch_inputs, batch_labels: self.step(batch_inputs,
                                                                      batch_labels, frozen))

    def on_batch(self, batches: BatchSource, indices: torch.Tensor, epoch: int,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """A step on the batch `batches` makes of `indices` in `epoch`, the making replayed
        in the same graph: only the indices are copied in. Should the data path not be
        capturable (an augmentation that reads the host, say), it runs op by op from then
        on, before the step's own graph, with a warning."""
        if self.batches_outside is None:
            key = ("indices", batches.epoch_key(epoch),
                   *(id(parameter) for parameter in frozen))
            try:
                return self._run(key, (indices,),
                                 lambda drawn: self.step(*batches(drawn, epoch), frozen),
                                 batches.generator)
            except _DataPathNotCaptured as failed:
                self.batches_outside = str(failed.__cause__)
                log.warning("the data path could not be captured in the step's CUDA graph "
                            "(%s); it runs op by op, the step still as a graph",
                            self.batches_outside)
        return self(*batches(indices, epoch), frozen)

    def _run(self, key: Hashable, arguments: tuple[torch.Tensor, ...],
             work: Callable[..., torch.Tensor],
             generator: torch.Generator | None = None) -> torch.Tensor:
        """`work(*arguments)`: eagerly for the first steps, then by replaying its graph
        for `key`, captured the first time the key comes."""
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
                if generator is None:  # the step alone: nothing to fall back to
                    raise
                raise _DataPathNotCaptured from error
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

    def _capture(self, arguments: tuple[torch.Tensor, ...], work: Callable[..., torch.Tensor],
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


class _DataPathNotCaptured(Exception):
    """The capture of a step with its data path failed (the cause says why)."""


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
