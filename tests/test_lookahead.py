"""Lookahead averaging follows airbench94's rule: every `every` steps the slow copy keeps
decay**every x (step/steps)**3 of itself, the weights are reset to it, and after the last
step the weights become it."""

from __future__ import annotations

import pytest
import torch

from cifar_exp.lookahead import Lookahead


def shift(model: torch.nn.Module, amount: float) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(amount)


def test_keep_ramps_cubically_to_decay_to_the_every():
    model = torch.nn.Linear(2, 2)
    lookahead = Lookahead(model, every=5, decay=0.95, steps=100)
    assert lookahead.keep(0) == 0
    assert lookahead.keep(50) == pytest.approx(0.95**5 * 0.125)
    assert lookahead.keep(100) == pytest.approx(0.95**5)


def test_weights_are_averaged_and_reset_every_few_steps():
    model = torch.nn.Linear(3, 2)
    lookahead = Lookahead(model, every=2, decay=0.9, steps=4)
    slow = model.weight.detach().clone()
    shift(model, 1.0)
    lookahead.after_step(model, 1)  # not an averaging step: nothing changes
    torch.testing.assert_close(model.weight, slow + 1.0)
    shift(model, 1.0)
    lookahead.after_step(model, 2)
    keep = 0.9**2 * (2 / 4) ** 3
    slow = keep * slow + (1 - keep) * (slow + 2.0)
    torch.testing.assert_close(model.weight, slow)


def test_the_last_step_puts_the_average_back():
    model = torch.nn.Linear(3, 2)
    lookahead = Lookahead(model, every=5, decay=0.95, steps=7)
    for step in range(1, 6):
        shift(model, 0.5)
        lookahead.after_step(model, step)
    average = model.weight.detach().clone()
    for step in (6, 7):
        shift(model, 3.0)
        lookahead.after_step(model, step)
    torch.testing.assert_close(model.weight, average)


def test_batch_norm_statistics_are_averaged_but_not_the_step_counter():
    model = torch.nn.BatchNorm1d(2)
    lookahead = Lookahead(model, every=1, decay=1.0, steps=2)  # keeps 1/8 at step 1
    model(torch.randn(16, 2) + 4)
    mean, var = model.running_mean.clone(), model.running_var.clone()
    lookahead.after_step(model, 1)
    torch.testing.assert_close(model.running_mean, 0.875 * mean)  # from 0
    torch.testing.assert_close(model.running_var, 0.125 + 0.875 * var)  # from 1
    assert model.num_batches_tracked.item() == 1


def test_state_round_trips_and_must_fit_the_model():
    model = torch.nn.Linear(3, 2)
    lookahead = Lookahead(model, every=1, decay=0.5, steps=4)
    shift(model, 1.0)
    lookahead.after_step(model, 2)
    copy = Lookahead(torch.nn.Linear(3, 2), every=1, decay=0.5, steps=4)
    copy.load_state_dict(lookahead.state_dict())
    for mine, theirs in zip(copy.state_dict()["slow"], lookahead.state_dict()["slow"],
                            strict=True):
        assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match="lookahead state holds 2 tensors, the model 4"):
        Lookahead(torch.nn.BatchNorm1d(3), 1, 0.5, 4).load_state_dict(lookahead.state_dict())
