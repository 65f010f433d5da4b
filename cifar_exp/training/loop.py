"""The generic training loop over one parts object (a `Parts`): steps, periodic
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
from cifar_exp.training.scoring import score_with_predictions
from cifar_exp.training.step import TrainingStep, memory_format, synchronize
from cifar_exp.world import SINGLE, World

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass(kw_only=True)
class LoopState:
    """What the loop itself holds at a step boundary, beyond the state of the parts it is
    given (`Parts.states()`): enough to continue exactly where it stopped."""

    step: int  # the last step done
    generator: torch.Tensor  # the training generator: batch order and augmentation draws
    sampler: dict[str, Any]
    window: dict[str, Any]  # losses and time of the log window in progress
    train_seconds: float
    scaler: dict[str, Any]  # fp16 loss scaling (empty otherwise)
    # The last evaluation's scores by name (empty before the first): a run resumed at its
    # last step reports them.
    scores: dict[str, float]

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


class LoopStep(Protocol):
    """The training step as the loop calls it: `step(indices, epoch, frozen) -> loss`
    (detached, on the device) trains on the batch made of the drawn `indices`; with the
    fp16 loss `scaler` a checkpoint saves."""

    scaler: torch.amp.GradScaler

    def __call__(self, indices: torch.Tensor, epoch: int,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor: ...


# Makes the step from the parts, the batch maker it makes its batches with and the training
# device (e.g. a packed sweep's member step, cifar_exp.training.packing); by default the
# trainer makes its own TrainingStep.
StepMaker = Callable[[Parts, BatchMaker, torch.device], LoopStep]


@dataclass
class TrainResult:
    scores: dict[str, float]  # the last evaluation's, by name (training.scoring.METRICS)
    examples_per_sec: float  # over all training steps, evaluation time excluded
    train_seconds: float  # of all the steps, those of earlier sessions of a resumed run too
    eval_seconds: float = 0.0  # of this session's evaluations
    # The last evaluation's predicted class of each test image, on every rank; None when
    # this session evaluated nothing (a run resumed after its last step).
    predicted: torch.Tensor | None = None

    @property
    def precision(self) -> float:
        return self.scores.get("precision", math.nan)

    @property
    def test_loss(self) -> float:
        return self.scores.get("test_loss", math.nan)


def train(parts: Parts, data: CifarData, sink: MetricSink, *,
          checkpoints: CheckpointSaver | None = None, resume: LoopState | None = None,
          stop: StopCheck | None = None, world: World = SINGLE,
          on_evaluation: Callable[[int, float], None] | None = None,
          make_step: StepMaker | None = None) -> TrainResult:
    """Train `parts` for its `settings.steps` steps on `data` (already on the model's
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
    trainer = _Trainer(parts, data, sink, world, make_step)
    if resume is not None:
        trainer.resume(resume)
    trainer.run(checkpoints, stop, on_evaluation)
    return trainer.result()


class _Trainer:
    """One call of `train`: what it builds, and its phases as methods."""

    def __init__(self, parts: Parts, data: CifarData, sink: MetricSink, world: World,
                 make_step: StepMaker | None) -> None:
        self.parts, self.data, self.sink, self.world = parts, data, sink, world
        settings = self.settings = parts.settings
        self.device = device = data.train_images.device
        self.generator = torch.Generator(device).manual_seed(settings.seed)
        self.sampler = EpochSampler(data.train_labels.numel(), settings.batch_size,
                                    self.generator, device)
        self.layout = memory_format(settings.channels_last)
        batches = BatchMaker(data, parts.augmentation, self.generator, self.layout, world)
        parts.model.to(memory_format=self.layout)
        parts.evaluated.to(memory_format=self.layout)
        parts.model.train()
        self.training_step: LoopStep
        if make_step is not None:
            self.training_step = make_step(parts, batches, device)
        else:
            self.training_step = TrainingStep(
                parts.model, parts.optimizer, batches, device, amp=settings.amp,
                compile_mode=settings.compile, data_parallel=world.distributed,
                label_smoothing=settings.label_smoothing, cuda_graph=settings.cuda_graph)
        self.window = _SpeedWindow(settings.batch_size, settings.log_every, device)
        self.train_seconds = 0.0
        self.scores: dict[str, float] = {}
        self.predicted: torch.Tensor | None = None
        self.eval_seconds = 0.0
        self.first_step = 1

    def resume(self, state: LoopState) -> None:
        """Go on from the step after `state.step`, as if the loop had never stopped."""
        self.generator.set_state(state.generator)
        self.sampler.load_state_dict(state.sampler)
        self.window.load_state_dict(state.window)
        if state.scaler:
            self.training_step.scaler.load_state_dict(state.scaler)
        self.train_seconds = state.train_seconds
        self.scores = dict(state.scores)
        self.first_step = state.step + 1

    def run(self, checkpoints: CheckpointSaver | None, stop: StopCheck | None,
            on_evaluation: Callable[[int, float], None] | None) -> None:
        """Every step from the first due: train, log, evaluate, checkpoint, stop."""
        settings = self.settings
        bar = tqdm(total=settings.steps, initial=self.first_step - 1, unit="step",
                   disable=not settings.progress or None, dynamic_ncols=True)
        with logging_redirect_tqdm(), bar:
            for step in range(self.first_step, settings.steps + 1):
                lr = self.one_step(step)
                bar.update()
                last = step == settings.steps
                if step % settings.log_every == 0 or last:
                    self.log_window(step, lr, bar)
                if step % settings.eval_every == 0 or last:  # every rank scores its part
                    self.evaluate(step, on_evaluation if not last else None)
                self.check_in(step, last, checkpoints, stop)

    def one_step(self, step: int) -> float:
        """One training step and what follows it; returns the lr it took."""
        parts, sampler = self.parts, self.sampler
        indices = sampler.next()
        lr = parts.optimizer.param_groups[0]["lr"]
        frozen = frozen_parameters(parts.model, sampler.epoch)
        loss = self.training_step(indices, sampler.epoch, frozen)
        if self.world.distributed:
            loss = mean_over_ranks(loss)
        parts.scheduler.step()
        if parts.lookahead is not None:
            parts.lookahead.after_step(step, sampler.epoch, sampler.epoch_ended)
        if parts.ema is not None:
            parts.ema.update(parts.model)
        self.window.add(loss, lr)
        return lr

    def log_window(self, step: int, lr: float, bar: tqdm) -> None:
        """Close the log window: its metrics to the sink and the console."""
        window = self.window
        mean_loss, examples_per_sec, sec_per_batch = window.close()
        self.train_seconds += window.seconds
        self.sink.log_metrics({"loss": mean_loss, "lr": lr,
                               "examples_per_sec": examples_per_sec,
                               "sec_per_batch": sec_per_batch}, step)
        if window.diverged is not None:
            raise window.diverged
        log.info("step %d, loss = %.2f (%.1f examples/sec; %.3f sec/batch)",
                 step, mean_loss, examples_per_sec, sec_per_batch)
        bar.set_postfix(loss=f"{mean_loss:.3f}", refresh=False)

    def evaluate(self, step: int,
                 on_evaluation: Callable[[int, float], None] | None) -> None:
        """Score the evaluated model, off the training clock; `on_evaluation` after (none
        at the last step: it ends the run anyway)."""
        parts, data, settings = self.parts, self.data, self.settings
        self.window.pause()
        eval_start = time.perf_counter()
        self.scores, self.predicted = score_with_predictions(
            parts.evaluated, parts.augmentation, data.test_images, data.test_labels,
            settings.eval_batch_size, memory_format=self.layout, amp=settings.amp,
            tta=settings.tta, world=self.world)
        self.sink.log_metrics(self.scores, step)
        log.info("step %d, precision @ 1 = %.4f, test loss = %.4f",
                 step, self.scores["precision"], self.scores["test_loss"])
        if on_evaluation is not None:
            on_evaluation(step, self.scores["precision"])
        self.eval_seconds += time.perf_counter() - eval_start
        self.window.resume()

    def check_in(self, step: int, last: bool, checkpoints: CheckpointSaver | None,
                 stop: StopCheck | None) -> None:
        """After a step: a stop request, and a checkpoint where one is due; Stopped when
        asked to stop."""
        signum = stop() if stop is not None else None
        if self.world.distributed:  # every rank stops at the same step
            signum = agree_on_stop(signum, self.device)
        if signum is not None:
            log.warning("step %d, %s received: stopping here", step,
                        signal.Signals(signum).name)
        if checkpoints is not None and (
                last or signum is not None
                or (checkpoints.every > 0 and step % checkpoints.every == 0)):
            self.save_checkpoint(step, checkpoints)
        if signum is not None:
            raise Stopped(signum, step)

    def save_checkpoint(self, step: int, checkpoints: CheckpointSaver) -> None:
        window = self.window
        window.pause()
        window.check_finite()  # never replace the last good checkpoint by a diverged state
        checkpoints.save(LoopState(
            step=step, generator=self.generator.get_state(), sampler=self.sampler.state_dict(),
            window=window.state_dict(), train_seconds=self.train_seconds,
            scaler=self.training_step.scaler.state_dict(), scores=dict(self.scores)))
        window.resume()

    def result(self) -> TrainResult:
        settings = self.settings
        examples = settings.steps * settings.batch_size
        return TrainResult(dict(self.scores), examples / max(self.train_seconds, 1e-9),
                           self.train_seconds, self.eval_seconds, self.predicted)


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
