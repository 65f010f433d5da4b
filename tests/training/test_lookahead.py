"""Lookahead averaging follows airbench94's rule: from epoch `start_epochs`, every `every`
steps the slow copy keeps decay**every x (step/steps)**3 of itself and the weights are
reset to it; after the last step (and, as airbench94, at each epoch's end) the weights
become it."""

from __future__ import annotations

import pytest
import torch

from cifar_exp.training.lookahead import Lookahead


def shift(model: torch.nn.Module, amount: float) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(amount)


def test_keep_ramps_cubically_to_decay_to_the_every():
    lookahead = Lookahead(torch.nn.Linear(2, 2), every=5, decay=0.95, steps=100)
    assert lookahead.keep(0) == 0
    assert lookahead.keep(50) == pytest.approx(0.95**5 * 0.125)
    assert lookahead.keep(100) == pytest.approx(0.95**5)


def test_starts_at_its_epoch_then_averages_and_resets_every_few_steps():
    model = torch.nn.Linear(3, 2)
    lookahead = Lookahead(model, every=2, decay=0.9, steps=8, start_epochs=1)
    shift(model, 1.0)
    lookahead.after_step(2, epoch=0, epoch_ended=False)  # before its epoch: nothing
    assert lookahead.state_dict()["slow"] is None
    lookahead.after_step(4, epoch=1, epoch_ended=False)  # the slow copy starts here
    slow = model.weight.detach().clone()
    shift(model, 1.0)
    lookahead.after_step(5, epoch=1, epoch_ended=False)  # not an averaging step
    torch.testing.assert_close(model.weight, slow + 1.0)
    shift(model, 1.0)
    lookahead.after_step(6, epoch=1, epoch_ended=False)
    keep = 0.9**2 * (6 / 8) ** 3
    slow = keep * slow + (1 - keep) * (slow + 2.0)
    torch.testing.assert_close(model.weight, slow)


def test_with_reset_each_epoch_an_epoch_end_puts_the_average_back():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    plain_model = torch.nn.Linear(3, 2)
    plain_model.load_state_dict(model.state_dict())
    lookahead = Lookahead(model, every=5, decay=0.95, steps=12, reset_each_epoch=True)
    plain = Lookahead(plain_model, every=5, decay=0.95, steps=12)
    for step in range(1, 6):
        shift(model, 0.5)
        lookahead.after_step(step, epoch=0, epoch_ended=False)
        shift(plain_model, 0.5)
        plain.after_step(step, epoch=0, epoch_ended=False)
    average = model.weight.detach().clone()
    shift(model, 3.0)
    lookahead.after_step(6, epoch=0, epoch_ended=True)  # the epoch's last step
    torch.testing.assert_close(model.weight, average)
    shift(plain_model, 3.0)
    plain.after_step(6, epoch=0, epoch_ended=True)  # without reset_each_epoch: trains on
    torch.testing.assert_close(plain_model.weight, average + 3.0)
    shift(model, 3.0)
    lookahead.after_step(7, epoch=1, epoch_ended=False)  # mid-epoch: the weights train on
    torch.testing.assert_close(model.weight, average + 3.0)


def test_the_last_step_drops_the_steps_since_the_last_average():
    model = torch.nn.Linear(3, 2)
    lookahead = Lookahead(model, every=5, decay=0.95, steps=7)
    for step in range(1, 6):
        shift(model, 0.5)
        lookahead.after_step(step, epoch=0, epoch_ended=False)
    average = model.weight.detach().clone()
    for step in (6, 7):
        shift(model, 3.0)
        lookahead.after_step(step, epoch=0, epoch_ended=False)
    torch.testing.assert_close(model.weight, average)


def test_batch_norm_statistics_are_averaged_but_not_the_step_counter():
    model = torch.nn.BatchNorm1d(2)
    lookahead = Lookahead(model, every=1, decay=1.0, steps=2)
    lookahead.after_step(1, epoch=0, epoch_ended=False)  # starts from the initial state
    model(torch.randn(16, 2) + 4)
    mean, var = model.running_mean.clone(), model.running_var.clone()
    lookahead.after_step(2, epoch=0, epoch_ended=False)  # keeps all of the slow copy
    torch.testing.assert_close(model.running_mean, torch.zeros(2))
    torch.testing.assert_close(model.running_var, torch.ones(2))
    assert not torch.equal(mean, torch.zeros(2)) and not torch.equal(var, torch.ones(2))
    assert model.num_batches_tracked.item() == 1


def test_state_round_trips_and_must_fit_the_model():
    model = torch.nn.Linear(3, 2)
    lookahead = Lookahead(model, every=1, decay=0.5, steps=4)
    assert lookahead.state_dict() == {"slow": None}
    lookahead.after_step(1, epoch=0, epoch_ended=False)
    shift(model, 1.0)
    lookahead.after_step(2, epoch=0, epoch_ended=False)
    copy = Lookahead(torch.nn.Linear(3, 2), every=1, decay=0.5, steps=4)
    copy.load_state_dict(lookahead.state_dict())
    for mine, theirs in zip(copy.state_dict()["slow"], lookahead.state_dict()["slow"],
                            strict=True):
        assert torch.equal(mine, theirs)
    copy.load_state_dict({"slow": None})
    assert copy.state_dict() == {"slow": None}
    with pytest.raises(ValueError, match="lookahead state holds 2 tensors, the model 4"):
        Lookahead(torch.nn.BatchNorm1d(3), 1, 0.5, 4).load_state_dict(lookahead.state_dict())
