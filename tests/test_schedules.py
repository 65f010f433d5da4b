"""Learning-rate schedules, stepped once per training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifar_exp.optim import build_optimizer
from cifar_exp.schedules import SCHEDULES, build_schedule


def lrs(name: str, steps: int, steps_per_epoch: float = 10.0, lr: float = 0.1,
        **options) -> list[float]:
    optimizer = build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_schedule(name, optimizer, steps, steps_per_epoch, **options)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_constant():
    assert set(lrs("constant", 50)) == {0.1}


def test_staircase_decays_at_int_of_epochs_times_batches():
    # 2.5 epochs of 3.125 batches: int(7.8125) = 7, as TF's tutorial computes decay steps.
    seen = lrs("staircase", 20, steps_per_epoch=3.125, factor=0.1, every_epochs=2.5)
    assert seen[:7] == [0.1] * 7
    assert seen[7:14] == pytest.approx([0.01] * 7)
    assert seen[14] == pytest.approx(0.001)


def test_tutorial_decay_step():
    # 350 epochs of 50,000 / 128 batches: the first decay falls at step 136,718.
    optimizer = build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_schedule("staircase", optimizer, 100_000, 50_000 / 128)
    assert scheduler.step_size == 136_718


def test_cosine_anneals_to_min_lr():
    seen = lrs("cosine", 100, min_lr=0.001)
    assert seen[0] == 0.1 and seen[50] == pytest.approx(0.0505, abs=1e-3)
    assert seen[-1] == pytest.approx(0.001, abs=1e-4)


def test_warmup_linear_rises_then_falls_to_zero():
    seen = lrs("warmup_linear", 100, warmup_fraction=0.1, start_factor=0.01)
    assert seen[0] == pytest.approx(0.001)
    assert max(seen) == pytest.approx(0.1) and seen.index(max(seen)) == 10
    assert seen[-1] == pytest.approx(0.1 / 90, rel=1e-3)


def test_onecycle_peaks_at_the_optimizer_lr():
    seen = lrs("onecycle", 100, pct_start=0.25)
    assert seen[0] == pytest.approx(0.1 / 25)
    assert max(seen) == pytest.approx(0.1, rel=1e-3) and seen.index(max(seen)) in (24, 25)
    assert seen[-1] < 1e-4


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_runs_its_full_length(name):
    assert len(lrs(name, 30)) == 30


def test_triangle_rises_to_the_peak_then_falls_to_the_end_factor():
    steps = 476  # fast94's run: peak at int(0.23 * 476) = 109
    seen = lrs("triangle", steps, lr=1.5, start_factor=0.2, peak_fraction=0.23,
               end_factor=0.07)
    assert seen[0] == pytest.approx(0.3)
    assert max(seen) == pytest.approx(1.5) and seen.index(max(seen)) == 109
    rising, falling = np.diff(seen[:110]), np.diff(seen[109:])
    assert np.allclose(rising, rising[0]) and rising[0] > 0  # straight lines
    assert np.allclose(falling, falling[0]) and falling[0] < 0
    # The factor reaches end_factor at step `steps`, one past the last step taken.
    assert seen[-1] == pytest.approx(1.5 * (0.07 + 0.93 / (steps - 109)))


def test_triangle_without_warm_up_starts_at_the_peak():
    seen = lrs("triangle", 10, start_factor=0.5, peak_fraction=0.0, end_factor=0.0)
    assert seen[0] == pytest.approx(0.1) and seen[5] == pytest.approx(0.05)
