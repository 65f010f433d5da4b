"""The generic training loop over one parts object (an `Parts`): steps, periodic
logging and evaluation, optional EMA and lookahead, checkpoints at step boundaries, and a
stop on request (SIGINT/SIGTERM).

It knows nothing of Hydra or MLflow: it takes the built parts with their plain settings, a
metric sink and, optionally, a checkpoint saver, the state to resume from, a stop request
and the world of processes it trains in."""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cifar_exp.data import CifarData
from cifar_exp.errors import NonFiniteLoss, Stopped
from cifar_exp.models import frozen_parameters
from cifar_exp.training.batches import BatchMaker, EpochSampler
from cifar_exp.training.distributed import agree_on_stop, mean_over_ranks
from cifar_exp.training.parts import Parts
from cifar_exp.training.scoring import score
from cifar_exp.training.step import TrainingStep, memory_format, synchronize
from cifar_exp.training.step_graph import BatchSource
from cifar_exp.world import SINGLE, World

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass
class LoopState:
    """What the loop itself holds at a step boundary, beyond the state of the parts it is
    given (`Parts.states()`): enough to continue exactly where it stopped."""

    step: int  # the last step done
    generator: torch.Tensor  # the training generator: batch order and augmentation draws
    sampler: dict[str, Any]
    window: dict[str, Any]  # losses and time of the log window in progress
    train_seconds: float
    scaler: dict[str, Any]  # fp16 loss scaling (empty otherwise)
    precision: float  # the last evaluation's: a run resumed at its last step reports it
    test_loss: float

    def to_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> LoopState:
        return cls(**state)


class CheckpointSaver(Protocol):
    """Saves the parts' state with the loop's; the loop decides when."""

    every: int  # steps between checkpoints; 0: only at the end (and when stopped)

    def save(self, loop: LoopState) -> None: ...


StopCheck = Callable[[], int | None]  # the number of a signal that asked to stop, or None


class Step(Protocol):
    """A training step: `step(inputs, labels, frozen) -> loss` (detached, on the device), or
    `step.on_batch(batches, indices, epoch, frozen)` on the batch `batches` makes of drawn
    indices (what the trainer calls); with the fp16 loss `scaler` a checkpoint saves."""

    scaler: torch.amp.GradScaler

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor: ...

    def on_batch(self, batches: BatchSource, indices: torch.Tensor, epoch: int,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor: ...


# Makes the step from the parts and the training device (e.g. a packed sweep's member
# step, cifar_exp.training.packing); by default the trainer makes its own TrainingStep.
StepMaker = Callable[["Parts", torch.device], Step]


@dataclass
class TrainResult:
    precision: float
    test_loss: float
    examples_per_sec: float  # over all training steps, evaluation time excluded
    train_seconds: float  # of all the steps, those of earlier sessions of a resumed run too
    eval_seconds: float = 0.0  # of this session's evaluations


def train(parts: Parts, data: CifarData, sink: MetricSink, *,
          checkpoints: CheckpointSaver | None = None, resume: LoopState | None = None,
          stop: StopCheck | None = None, world: World = SINGLE,
          on_evaluation: Callable[[int, float], None] | None = None,
          make_step: StepMaker | None = None) -> TrainResult:
    """Train `experiment` for its `settings.steps` steps on `data` (already on the model's
    device).

    With `resume` (and the parts already loaded from the same checkpoint) the loop goes on
    from the step after `resume.step`, exactly as if it had never stopped. `checkpoints`
    saves every `checkpoints.every` steps, at the end, and when `stop` reports a signal,
    after which the loop raises Stopped.

    In a distributed `world` each rank trains on its slice of the same global batch; the
    logged loss is the global batch's, each rank evaluates its part of the test set (the
    sums are added over the ranks) and the caller gives only rank 0 a `checkpoints` saver
    and a real `sink`.

    `on_evaluation(step, precision)` is called after each evaluation; what it raises (an
    Optuna trial that is Pruned) ends training there. `make_step` replaces the trainer's
    own TrainingStep (a packed sweep's members step together)."""
    settings, model, optimizer = parts.settings, parts.model, parts.optimizer
    augmentation, ema, lookahead = parts.augmentation, parts.ema, parts.lookahead
    device = data.train_images.device
    generator = torch.Generator(device).manual_seed(settings.seed)
    sampler = EpochSampler(data.train_labels.numel(), settings.batch_size, generator, device)
    layout = memory_format(settings.channels_last)
    batches = BatchMaker(data, augmentation, generator, layout, world)
    model.to(memory_format=layout)
    evaluated = parts.evaluated
    evaluated.to(memory_format=layout)
    model.train()
    training_step: Step
    if make_step is not None:
        training_step = make_step(parts, device)
    else:
        training_step = TrainingStep(model, optimizer, device, settings.amp, settings.compile,
                                     data_parallel=world.distributed,
                                     label_smoothing=settings.label_smoothing,
                                     cuda_graph=settings.cuda_graph)

    window = _SpeedWindow(settings.batch_size, settings.log_every, device)
    train_seconds = 0.0
    precision = test_loss = float("nan")
    eval_seconds = 0.0
    first_step = 1
    if resume is not None:
        generator.set_state(resume.generator)
        sampler.load_state_dict(resume.sampler)
        window.load_state_dict(resume.window)
        if resume.scaler:
            training_step.scaler.load_state_dict(resume.scaler)
        train_seconds = resume.train_seconds
        precision, test_loss = resume.precision, resume.test_loss
        first_step = resume.step + 1

    def save_checkpoint(step: int) -> None:
        assert checkpoints is not None
        window.pause()
        window.check_finite()  # never replace the last good checkpoint by a diverged state
        checkpoints.save(LoopState(step, generator.get_state(), sampler.state_dict(),
                                   window.state_dict(), train_seconds,
                                   training_step.scaler.state_dict(), precision, test_loss))
        window.resume()

    bar = tqdm(total=settings.steps, initial=first_step - 1, unit="step",
               disable=not settings.progress or None, dynamic_ncols=True)
    with logging_redirect_tqdm(), bar:
        for step in range(first_step, settings.steps + 1):
            indices = sampler.next()
            lr = optimizer.param_groups[0]["lr"]
            frozen = frozen_parameters(model, sampler.epoch)
            loss = training_step.on_batch(batches, indices, sampler.epoch, frozen)
            if world.distributed:
                loss = mean_over_ranks(loss)
            parts.scheduler.step()
            if lookahead is not None:
                lookahead.after_step(step, sampler.epoch, sampler.epoch_ended)
            if ema is not None:
                ema.update(model)
            window.add(loss, lr)
            bar.update()

            last = step == settings.steps
            if step % settings.log_every == 0 or last:
                mean_loss, examples_per_sec, sec_per_batch = window.close()
                train_seconds += window.seconds
                sink.log_metrics({"loss": mean_loss, "lr": lr,
                                  "examples_per_sec": examples_per_sec,
                                  "sec_per_batch": sec_per_batch}, step)
                if window.diverged is not None:
                    raise window.diverged
                log.info("step %d, loss = %.2f (%.1f examples/sec; %.3f sec/batch)",
                         step, mean_loss, examples_per_sec, sec_per_batch)
                bar.set_postfix(loss=f"{mean_loss:.3f}", refresh=False)
            if step % settings.eval_every == 0 or last:  # every rank scores its part
                window.pause()
                eval_start = time.perf_counter()
                precision, test_loss = score(evaluated, augmentation, data.test_images,
                                                data.test_labels, settings.eval_batch_size,
                                                layout, settings.amp, settings.tta,
                                                world)
                sink.log_metrics({"precision": precision, "test_loss": test_loss}, step)
                log.info("step %d, precision @ 1 = %.4f, test loss = %.4f",
                         step, precision, test_loss)
                if on_evaluation is not None and not last:  # a last one ends the run anyway
                    on_evaluation(step, precision)
                eval_seconds += time.perf_counter() - eval_start
                window.resume()
            signum = stop() if stop is not None else None
            if world.distributed:  # every rank stops at the same step
                signum = agree_on_stop(signum, device)
            if signum is not None:
                log.warning("step %d, %s received: stopping here", step,
                            signal.Signals(signum).name)
            due = checkpoints is not None and (
                last or signum is not None
                or (checkpoints.every > 0 and step % checkpoints.every == 0))
            if due:
                save_checkpoint(step)
            if signum is not None:
                raise Stopped(signum, step)
    examples = settings.steps * settings.batch_size
    return TrainResult(precision, test_loss, examples / max(train_seconds, 1e-9), train_seconds,
                       eval_seconds)


class _SpeedWindow:
    """Losses and throughput since the last log line. Each step's loss is copied into a
    buffer on the device (one small copy, no host sync); the log step reads the buffer at
    once, which gives the mean and the first step whose loss was not finite. The buffer
    holds at most CHUNK steps, whatever `log_every` is: a longer window is read and summed
    chunk by chunk as it fills."""

    CHUNK = 1024

    def __init__(self, batch_size: int, log_every: int, device: torch.device) -> None:
        self.batch_size = batch_size
        self.losses = torch.zeros(min(log_every, self.CHUNK), device=device)
        self.lrs: list[float] = []  # of the steps in the buffer
        self.first_step = 1  # of the window
        self._sums: list[float] = []  # exact sums of the window's earlier chunks
        self._summed = 0  # how many steps they hold
        self._early: NonFiniteLoss | None = None  # the first non-finite loss among them
        self.diverged: NonFiniteLoss | None = None
        self.seconds = 0.0
        self._start = self._paused_at = time.perf_counter()

    def add(self, loss: torch.Tensor, lr: float) -> None:
        if len(self.lrs) == self.losses.numel():
            self._fold()
        self.losses[len(self.lrs)].copy_(loss)
        self.lrs.append(lr)

    def _fold(self) -> None:
        """Sum the full buffer into the window's partial sums and empty it."""
        losses = self.losses[: len(self.lrs)].tolist()  # waits for the device
        self._early = self._early or self._first_non_finite(losses, self.first_step
                                                            + self._summed)
        self._sums.append(math.fsum(losses))
        self._summed += len(losses)
        self.lrs.clear()

    def close(self) -> tuple[float, float, float]:
        """(mean loss, examples/sec, sec/batch) of the window, then start a new one."""
        losses = self.losses[: len(self.lrs)].tolist()  # waits for the device
        steps = self._summed + len(losses)
        self.diverged = self._early or self._first_non_finite(losses, self.first_step
                                                              + self._summed)
        mean_loss = math.fsum([*self._sums, *losses]) / steps
        self.seconds = time.perf_counter() - self._start
        examples_per_sec = steps * self.batch_size / self.seconds
        sec_per_batch = self.seconds / steps
        self.first_step += steps
        self.lrs.clear()
        self._sums, self._summed, self._early = [], 0, None
        self._start = time.perf_counter()
        return mean_loss, examples_per_sec, sec_per_batch

    def _first_non_finite(self, losses: list[float], first_step: int) -> NonFiniteLoss | None:
        """The first of `losses` (of the buffer, from step `first_step`) that is not finite."""
        for offset, loss in enumerate(losses):
            if not math.isfinite(loss):
                return NonFiniteLoss(first_step + offset, loss, self.lrs[offset])
        return None

    def check_finite(self) -> None:
        """Raise NonFiniteLoss if a loss of the window so far is inf or nan."""
        diverged = self._early or self._first_non_finite(
            self.losses[: len(self.lrs)].tolist(), self.first_step + self._summed)
        if diverged is not None:
            raise diverged

    def pause(self) -> None:
        """Stop the clock (for evaluation) once queued training work has finished."""
        synchronize(self.losses.device)
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        self._start += time.perf_counter() - self._paused_at

    def state_dict(self) -> dict[str, Any]:
        """The window in progress; call while paused (the clock stands at the pause). A
        window with a non-finite loss is never saved (check_finite comes first)."""
        steps = len(self.lrs)
        return {"losses": self.losses[:steps].cpu(), "lrs": list(self.lrs),
                "first_step": self.first_step, "sums": list(self._sums),
                "summed": self._summed, "seconds": self._paused_at - self._start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_step = int(state["first_step"])
        self._sums, self._summed = list(state["sums"]), int(state["summed"])
        self.lrs = []
        for loss, lr in zip(state["losses"].tolist(), state["lrs"], strict=True):
            self.add(torch.tensor(loss), lr)  # a saved buffer longer than CHUNK folds here
        self._start = time.perf_counter() - float(state["seconds"])
