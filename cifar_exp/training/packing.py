"""A pack: the jobs of a sweep trained at once in one process, one thread each, every step
of theirs taken together as one stacked step (cifar_exp.training.stacked_step).

Each member runs the ordinary job (its own run folder, MLflow run, checkpoints, evaluations,
logs); only its training step goes through the pack. The step waits until every member
still training has handed in its batch; the last to arrive runs the stacked step for all.
A member that ends (finished, diverged, refused, stopped) leaves the pack and the others go
on without it."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from cifar_exp.training.stacked_step import Member, signature, stacked_step

if TYPE_CHECKING:
    from cifar_exp.training.batches import BatchMaker
    from cifar_exp.training.loop import StepMaker, StopCheck
    from cifar_exp.training.parts import Parts


class Pack:
    """Rendezvous of `size` members' training steps. `stop` is the pack's stop check (signal
    handlers belong to the main thread, where the launcher waits); `index` numbers the packs
    of a sweep, which take the visible GPUs in turn."""

    def __init__(self, size: int, stop: StopCheck | None = None, index: int = 0) -> None:
        self.expected = size  # members not yet gone: each one's step is awaited
        self.stop, self.index = stop, index
        self.steps = 0  # stacked steps run so far
        self._ready = threading.Condition()
        self._waiting: dict[int, tuple[Member, torch.device, str]] = {}
        self._results: dict[int, torch.Tensor] = {}
        self._error: BaseException | None = None
        self._round = 0

    def step_maker(self, member_id: int) -> StepMaker:
        """For `train(make_step=...)`: member `member_id`'s step (0 .. size-1), made with
        the member's parts, batch maker and device."""
        return functools.partial(PackedStep, self, member_id)

    def leave(self) -> None:
        """A member is done: the others no longer wait for it."""
        with self._ready:
            self.expected -= 1
            self._run_if_complete()

    def take_step(self, member_id: int, member: Member, device: torch.device,
                  amp: str) -> torch.Tensor:
        """Hand in a batch; returns this member's loss once the stacked step has run."""
        with self._ready:
            self._waiting[member_id] = (member, device, amp)
            round_joined = self._round
            self._run_if_complete()
            while self._round == round_joined:
                self._ready.wait()
            if self._error is not None:
                raise self._error
            return self._results.pop(member_id)

    def _run_if_complete(self) -> None:
        """Run the stacked step once every member still in the pack has handed in its
        batch (called with the lock held, by the last to arrive or to leave)."""
        if not self._waiting or len(self._waiting) < self.expected:
            return
        waiting, self._waiting = self._waiting, {}
        try:
            # Members whose networks or batches differ in shape (a model option or the batch
            # size swept) cannot share one stack: each kind steps apart.
            kinds: dict[tuple, list[int]] = {}
            for member_id, (member, device, amp) in waiting.items():
                kind = (signature(member.model), tuple(member.inputs.shape), device, amp)
                kinds.setdefault(kind, []).append(member_id)
            for (_, _, device, amp), ids in kinds.items():
                losses = stacked_step([waiting[i][0] for i in ids], device, amp)
                self._results.update(zip(ids, losses, strict=True))
            self.steps += 1
            self._error = None
        except BaseException as error:  # every waiting member raises it, not just one
            self._error = error
        self._round += 1
        self._ready.notify_all()


class PackedStep:
    """Stands in for a member's TrainingStep: `step(indices, epoch, frozen) -> loss`, the
    member's own batch (made by its `batches`, in its thread) taken with the rest of the
    pack. `scaler` is the member's own (a checkpoint saves it)."""

    def __init__(self, pack: Pack, member_id: int, parts: Parts, batches: BatchMaker,
                 device: torch.device) -> None:
        self.pack, self.member_id = pack, member_id
        self.parts, self.batches, self.device = parts, batches, device
        # fp16 needs loss scaling to keep small gradients; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=parts.settings.amp == "fp16")

    def __call__(self, indices: torch.Tensor, epoch: int,
                 frozen: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        parts = self.parts
        inputs, labels = self.batches(indices, epoch)
        member = Member(parts.model, parts.optimizer, self.scaler,
                        parts.settings.label_smoothing, inputs, labels, frozen=frozen)
        return self.pack.take_step(self.member_id, member, self.device,
                                   parts.settings.amp)
