"""The step profiler counts per step what a window of steps dispatched and writes a trace."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import nn

from cifar_exp.tools.profiling import WindowProfiler


def _model_step() -> Callable[[], None]:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, labels = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])

    def step() -> None:
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def test_operators_per_step_are_the_window_divided_by_its_steps(tmp_path):
    step = _model_step()
    step()  # the optimizer's state and the first-call costs stay outside the window
    profiles = []
    for steps in (1, 3):
        profiler = WindowProfiler(torch.device("cpu"))
        profiler.start()
        for _ in range(steps):
            step()
        profiler.stop()
        profiles.append(profiler.summary(steps, tmp_path / f"trace_{steps}.json"))
    one, three = profiles
    # The same step dispatches the same operators each time: conv, relu, linear, the loss,
    # their gradients and the optimizer's update, a few dozen in all.
    assert 20 < one.operators_per_step < 200
    assert three.operators_per_step == pytest.approx(one.operators_per_step)
    assert three.steps == 3 and three.ms_per_step > 0
    assert one.launches_per_step is None  # no GPU
    assert "aten::" in three.table and "Self CPU" in three.table


def test_the_trace_is_a_chrome_trace_of_the_operators(tmp_path):
    step = _model_step()
    profiler = WindowProfiler(torch.device("cpu"))
    profiler.start()
    step()
    profiler.stop()
    trace = tmp_path / "traces" / "step.json"
    profile = profiler.summary(1, trace)
    assert profile.trace == trace
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert {"aten::convolution_backward", "aten::relu"} <= names


def test_operators_nested_in_another_operator_are_not_counted(tmp_path):
    # linear dispatches t and addmm inside itself: one operator, as seen from Python.
    layer, inputs = nn.Linear(4, 3), torch.randn(2, 4)
    with torch.no_grad():
        profiler = WindowProfiler(torch.device("cpu"))
        profiler.start()
        layer(inputs)
        profiler.stop()
    assert profiler.summary(1, tmp_path / "linear.json").operators_per_step == 1
