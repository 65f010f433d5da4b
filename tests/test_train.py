"""The generic training loop, on a slice of the real data."""

from __future__ import annotations

import math

import pytest
import torch

from cifar_exp.augment import build_augmentation
from cifar_exp.data import CifarData
from cifar_exp.ema import WeightAverage
from cifar_exp.errors import NonFiniteLoss
from cifar_exp.evaluate import evaluate
from cifar_exp.models import build_model
from cifar_exp.optim import build_optimizer
from cifar_exp.schedules import build_schedule
from cifar_exp.train import TrainSettings, train


class ListSink:
    def __init__(self) -> None:
        self.points: list[tuple[str, float, int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.points.extend((key, value, step) for key, value in metrics.items())

    def steps(self, key: str) -> list[int]:
        return [step for name, _, step in self.points if name == key]

    def values(self, key: str) -> list[float]:
        return [value for name, value, _ in self.points if name == key]


@pytest.fixture(scope="module")
def slice_data(cifar10) -> CifarData:
    return CifarData(cifar10.train_images[:256], cifar10.train_labels[:256],
                     cifar10.test_images[:300], cifar10.test_labels[:300], cifar10.classes)


def run(data: CifarData, settings: TrainSettings, ema_decay: float | None = None,
        schedule: str = "constant", optimizer: tuple[str, dict] = ("adam", {"lr": 1e-3}),
        sink: ListSink | None = None):
    torch.manual_seed(0)
    augmentation = build_augmentation("tf_distort", data.train_images)
    model = build_model("tf_cnn", 10, augmentation.image_size)
    optimizer_name, optimizer_options = optimizer
    built_optimizer = build_optimizer(optimizer_name, model.parameters(), **optimizer_options)
    scheduler = build_schedule(schedule, built_optimizer, settings.steps,
                               256 / settings.batch_size)
    ema = WeightAverage(model, ema_decay) if ema_decay is not None else None
    sink = sink if sink is not None else ListSink()
    result = train(model, built_optimizer, scheduler, augmentation, data, settings, sink, ema)
    return result, sink, model, ema


def test_logs_every_metric_on_schedule(slice_data):
    settings = TrainSettings(steps=25, batch_size=32, log_every=10, eval_every=20,
                             eval_batch_size=128, progress=False)
    result, sink, _, _ = run(slice_data, settings)
    for key in ("loss", "lr", "examples_per_sec", "sec_per_batch"):
        assert sink.steps(key) == [10, 20, 25], key
    assert sink.steps("precision") == sink.steps("test_loss") == [20, 25]
    assert sink.values("precision")[-1] == result.precision
    assert 0.0 <= result.precision <= 1.0 and result.test_loss > 0
    assert result.examples_per_sec > 0 and result.train_seconds > 0
    assert set(sink.values("lr")) == {1e-3}


def test_loss_falls_on_a_small_set(slice_data):
    settings = TrainSettings(steps=80, batch_size=64, log_every=10, eval_every=1000,
                             progress=False)
    _, sink, _, _ = run(slice_data, settings)
    losses = sink.values("loss")
    assert losses[-1] < losses[0] - 1.0  # weight decay term included: starts near 4.5


def test_same_seed_same_weights(slice_data):
    settings = TrainSettings(steps=6, batch_size=32, log_every=3, eval_every=6,
                             progress=False)
    _, _, first, _ = run(slice_data, settings)
    _, _, second, _ = run(slice_data, settings)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_ema_model_is_evaluated(slice_data):
    settings = TrainSettings(steps=10, batch_size=32, log_every=5, eval_every=10,
                             progress=False)
    result, _, model, ema = run(slice_data, settings, ema_decay=0.9999)
    augmentation = build_augmentation("tf_distort", slice_data.train_images)
    args = (augmentation, slice_data.test_images, slice_data.test_labels,
            settings.eval_batch_size, torch.channels_last)
    assert evaluate(ema.model, *args) == (result.precision, result.test_loss)
    assert evaluate(model, *args)[1] != result.test_loss


def test_console_line_matches_the_seed(slice_data, caplog):
    settings = TrainSettings(steps=10, batch_size=32, log_every=10, eval_every=10,
                             progress=False)
    with caplog.at_level("INFO", logger="cifar_exp.train"):
        run(slice_data, settings)
    assert any(message.startswith("step 10, loss = ") and "examples/sec; " in message
               and message.endswith(" sec/batch)") for message in caplog.messages)


def test_non_finite_loss_stops_with_the_step_and_lr(slice_data):
    sink = ListSink()
    settings = TrainSettings(steps=50, batch_size=32, log_every=10, eval_every=50,
                             progress=False)
    with pytest.raises(NonFiniteLoss) as error:
        run(slice_data, settings, optimizer=("sgd", {"lr": 1e6, "momentum": 0.0}), sink=sink)
    diverged = error.value
    assert 1 <= diverged.step <= 10 and not math.isfinite(diverged.loss)
    assert diverged.lr == 1e6
    assert str(diverged).startswith(f"loss became {diverged.loss} at step {diverged.step} "
                                    f"(lr 1e+06)")
    assert sink.steps("loss") == [10]  # the diverged window is logged, then training stops
    assert sink.steps("precision") == []
