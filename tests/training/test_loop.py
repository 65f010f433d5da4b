"""The generic training loop, on a slice of the real data."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch

from cifar_exp.augment import build_augmentation
from cifar_exp.data import CifarData
from cifar_exp.errors import NonFiniteLoss, Stopped
from cifar_exp.job.checkpoint import Checkpointer, atomic_save, load_checkpoint, restore
from cifar_exp.models import build_model
from cifar_exp.optim import build_optimizer
from cifar_exp.schedules import build_schedule
from cifar_exp.training.ema import WeightAverage
from cifar_exp.training.lookahead import Lookahead
from cifar_exp.training.loop import (
    LoopState,
    TrainResult,
    _SpeedWindow,
    train,
)
from cifar_exp.training.parts import Parts, TrainSettings
from cifar_exp.training.scoring import score
from tests.conftest import train_settings
from tests.job.test_checkpoint import written_as_format


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


def saved_by(parts: Parts, path: Path, every: int = 0) -> Checkpointer:
    return Checkpointer(path, every, parts.states(), {"steps": 1})


def restored(parts: Parts, path: Path) -> LoopState:
    return restore(load_checkpoint(path), path, parts.states())


def build_parts(data: CifarData, settings: TrainSettings, ema_decay: float | None = None,
                schedule: str = "constant",
                optimizer: tuple[str, dict] = ("adam", {"lr": 1e-3}),
                lookahead_every: int | None = None) -> Parts:
    torch.manual_seed(0)
    augmentation = build_augmentation("tf_distort", data.train_images)
    model = build_model("tf_cnn", 10, augmentation.image_size)
    optimizer_name, optimizer_options = optimizer
    built_optimizer = build_optimizer(optimizer_name, model.parameters(), **optimizer_options)
    scheduler = build_schedule(schedule, built_optimizer, settings.steps,
                               256 / settings.batch_size)
    ema = WeightAverage(model, ema_decay) if ema_decay is not None else None
    # From the second epoch, reset at epoch ends: every branch of the rule is taken.
    lookahead = (Lookahead(model, lookahead_every, 0.95, settings.steps, start_epochs=1,
                           reset_each_epoch=True)
                 if lookahead_every is not None else None)
    return Parts(augmentation, model, built_optimizer, scheduler, ema=ema,
                      lookahead=lookahead, settings=settings)


def train_parts(parts: Parts, data: CifarData, sink: ListSink | None = None,
                **options) -> tuple[TrainResult, ListSink]:
    sink = sink if sink is not None else ListSink()
    return train(parts, data, sink, **options), sink


def run(data: CifarData, settings: TrainSettings, ema_decay: float | None = None,
        schedule: str = "constant", optimizer: tuple[str, dict] = ("adam", {"lr": 1e-3}),
        sink: ListSink | None = None):
    parts = build_parts(data, settings, ema_decay, schedule, optimizer)
    result, sink = train_parts(parts, data, sink)
    return result, sink, parts.model, parts.ema


def test_logs_every_metric_on_schedule(slice_data):
    settings = train_settings(steps=25, batch_size=32, log_every=10, eval_every=20,
                             eval_batch_size=128, progress=False)
    result, sink, _, _ = run(slice_data, settings)
    for key in ("loss", "lr", "examples_per_sec", "sec_per_batch"):
        assert sink.steps(key) == [10, 20, 25], key
    assert sink.steps("precision") == sink.steps("test_loss") == [20, 25]
    assert sink.steps("precision_top5") == [20, 25]  # every score, by its name
    assert sink.values("precision")[-1] == result.precision
    assert result.scores == {key: sink.values(key)[-1]
                             for key in ("precision", "test_loss", "precision_top5")}
    assert result.precision <= result.scores["precision_top5"] <= 1.0
    assert 0.0 <= result.precision <= 1.0 and result.test_loss > 0
    assert result.examples_per_sec > 0 and result.train_seconds > 0
    assert set(sink.values("lr")) == {1e-3}


def test_loss_falls_on_a_small_set(slice_data):
    settings = train_settings(steps=80, batch_size=64, log_every=10, eval_every=1000,
                             progress=False)
    _, sink, _, _ = run(slice_data, settings)
    losses = sink.values("loss")
    assert losses[-1] < losses[0] - 1.0  # weight decay term included: starts near 4.5


def test_same_seed_same_weights(slice_data):
    settings = train_settings(steps=6, batch_size=32, log_every=3, eval_every=6,
                             progress=False)
    _, _, first, _ = run(slice_data, settings)
    _, _, second, _ = run(slice_data, settings)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_ema_model_is_evaluated(slice_data):
    settings = train_settings(steps=10, batch_size=32, log_every=5, eval_every=10,
                             progress=False)
    result, _, model, ema = run(slice_data, settings, ema_decay=0.9999)
    augmentation = build_augmentation("tf_distort", slice_data.train_images)
    args = (augmentation, slice_data.test_images, slice_data.test_labels,
            settings.eval_batch_size)
    ema_scores = score(ema.model, *args, memory_format=torch.channels_last)
    assert (ema_scores["precision"], ema_scores["test_loss"]) == (result.precision,
                                                                  result.test_loss)
    assert score(model, *args, memory_format=torch.channels_last)["test_loss"] != \
        result.test_loss


def test_lookahead_leaves_the_weights_at_its_average(slice_data):
    # 256 images in batches of 32: 8 steps an epoch. 12 steps, averaged every 5 from the
    # second epoch: the average starts at step 10; steps 11 and 12 train on, then the last
    # step puts the average back.
    settings = train_settings(steps=12, batch_size=32, log_every=6, eval_every=12,
                             progress=False)
    parts = build_parts(slice_data, settings, lookahead_every=5)
    calls, average_at_10 = [], {}

    def note_average(step, epoch, epoch_ended, after_step=parts.lookahead.after_step):
        calls.append((step, epoch, epoch_ended))
        after_step(step, epoch, epoch_ended)
        if step == 10:
            average_at_10.update({k: v.clone() for k, v in parts.model.state_dict().items()})

    parts.lookahead.after_step = note_average
    result, _ = train_parts(parts, slice_data)
    assert calls == [(step, (step - 1) // 8, step == 8) for step in range(1, 13)]
    for key, value in parts.model.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, average_at_10[key]), key
    augmentation = build_augmentation("tf_distort", slice_data.train_images)
    assert score(parts.model, augmentation, slice_data.test_images, slice_data.test_labels,
                 settings.eval_batch_size,
                 memory_format=torch.channels_last)["precision"] == result.precision


def test_console_line_matches_the_tutorials(slice_data, caplog):
    settings = train_settings(steps=10, batch_size=32, log_every=10, eval_every=10,
                             progress=False)
    with caplog.at_level("INFO", logger="cifar_exp.training.loop"):
        run(slice_data, settings)
    assert any(message.startswith("step 10, loss = ") and "examples/sec; " in message
               and message.endswith(" sec/batch)") for message in caplog.messages)


def test_non_finite_loss_stops_with_the_step_and_lr(slice_data):
    sink = ListSink()
    settings = train_settings(steps=50, batch_size=32, log_every=10, eval_every=50,
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


def assert_identical(actual, expected) -> None:
    """Equal to the bit: tensors by torch.equal, containers item by item, the rest by ==."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_identical(actual[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for a, b in zip(actual, expected, strict=True):
            assert_identical(a, b)
    else:
        assert actual == expected


def stop_after(calls: int, signum: int = signal.SIGTERM):
    """A stop check that reports `signum` from its `calls`-th call on (one call per step)."""
    count = 0

    def check() -> int | None:
        nonlocal count
        count += 1
        return signum if count >= calls else None

    return check


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(slice_data, tmp_path):
    # A stop mid log window (log_every 4, stop at step 11), with EMA, lookahead (started at
    # step 10, reset at 12) and a schedule whose state changes every step:
    # everything the loop holds must come back.
    settings = train_settings(steps=12, batch_size=32, log_every=4, eval_every=6,
                             eval_batch_size=150, progress=False)
    options = {"ema_decay": 0.99, "schedule": "onecycle", "lookahead_every": 5}
    whole = build_parts(slice_data, settings, **options)
    whole_result, whole_sink = train_parts(whole, slice_data)

    path = tmp_path / "checkpoint.pt"
    first = build_parts(slice_data, settings, **options)
    first_sink = ListSink()
    with pytest.raises(Stopped) as stopped:
        train_parts(first, slice_data, first_sink, checkpoints=saved_by(first, path),
                    stop=stop_after(11))
    assert stopped.value.step == 11 and stopped.value.exit_code == 143
    assert load_checkpoint(path)["step"] == 11

    second = build_parts(slice_data, settings, **options)
    torch.manual_seed(123)  # the checkpoint restores the global RNG too
    loop = restored(second, path)
    assert loop.step == 11
    result, second_sink = train_parts(second, slice_data, checkpoints=saved_by(second, path),
                                      resume=loop)

    assert second.states().keys() == {"model", "optimizer", "scheduler", "ema", "lookahead"}
    for name, part in second.states().items():
        assert_identical(part.state_dict(), whole.states()[name].state_dict())
    assert result.precision == whole_result.precision
    # Every point is logged once, by one of the two jobs, with the uninterrupted values.
    for key in ("loss", "lr", "precision", "test_loss"):
        points = sorted(zip(first_sink.steps(key) + second_sink.steps(key),
                            first_sink.values(key) + second_sink.values(key), strict=True))
        assert points == list(zip(whole_sink.steps(key), whole_sink.values(key),
                                  strict=True)), key
    assert load_checkpoint(path)["step"] == 12  # the final checkpoint


@pytest.mark.parametrize("version", [1, 2])
def test_a_checkpoint_of_an_older_format_resumes_as_the_run_would_go_on(slice_data, tmp_path,
                                                                        version):
    # Stopped at step 7, after the evaluation at step 4; saved as format 1 or 2 wrote it.
    settings = train_settings(steps=8, batch_size=32, log_every=4, eval_every=4,
                              eval_batch_size=150, progress=False)
    whole = build_parts(slice_data, settings)
    whole_result, whole_sink = train_parts(whole, slice_data)
    path = tmp_path / "checkpoint.pt"
    first = build_parts(slice_data, settings)
    with pytest.raises(Stopped):
        train_parts(first, slice_data, checkpoints=saved_by(first, path), stop=stop_after(7))
    atomic_save(written_as_format(version, torch.load(path, weights_only=True)), path)

    second = build_parts(slice_data, settings)
    loop = restored(second, path)
    assert loop.step == 7
    assert loop.scores == {key: whole_sink.values(key)[0] for key in ("precision", "test_loss")}
    result, second_sink = train_parts(second, slice_data, resume=loop)
    for name, part in second.states().items():
        assert_identical(part.state_dict(), whole.states()[name].state_dict())
    assert result.scores == whole_result.scores
    assert second_sink.steps("loss") == [8] and second_sink.values("loss") == \
        whole_sink.values("loss")[1:]


@pytest.mark.parametrize("every,saved_at", [(4, [4, 8, 11]), (0, [11])])
def test_checkpoints_on_schedule_and_at_the_end(slice_data, tmp_path, caplog, every, saved_at):
    settings = train_settings(steps=11, batch_size=32, log_every=5, eval_every=100,
                             eval_batch_size=150, progress=False)
    parts = build_parts(slice_data, settings)
    with caplog.at_level("INFO", logger="cifar_exp.job.checkpoint"):
        train_parts(parts, slice_data, checkpoints=saved_by(parts, tmp_path / "c.pt", every))
    saved = [m.split(",")[0] for m in caplog.messages if "checkpoint saved" in m]
    assert saved == [f"step {step}" for step in saved_at]


def test_diverged_run_keeps_the_last_good_checkpoint(slice_data, tmp_path):
    settings = train_settings(steps=30, batch_size=32, log_every=10, eval_every=100,
                             eval_batch_size=150, progress=False)
    parts = build_parts(slice_data, settings, optimizer=("sgd", {"lr": 0.01, "momentum": 0.0}))
    # lr 0.01 for 10 steps, then 1e6: the loss turns inf/nan within a few steps.
    parts.scheduler = torch.optim.lr_scheduler.LambdaLR(
        parts.optimizer, lambda step: 1.0 if step < 10 else 1e8)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(NonFiniteLoss) as error:
        train_parts(parts, slice_data, checkpoints=saved_by(parts, path, every=5))
    assert error.value.step > 10
    kept = load_checkpoint(path)
    assert kept["step"] == 10
    assert all(torch.isfinite(tensor).all() for tensor in kept["states"]["model"].values())


class RecordingAugmentation:
    """crop_flip with alternating flip, noting which images each step drew in which epoch."""

    def __init__(self, train_images: torch.Tensor) -> None:
        self.inner = build_augmentation("crop_flip", train_images, alternating_flip=True)
        self.image_size = self.inner.image_size
        self.calls: list[tuple[torch.Tensor, int]] = []

    def train(self, images, generator, indices=None, epoch=0):
        self.calls.append((indices.clone(), epoch))
        return self.inner.train(images, generator, indices, epoch)

    def eval(self, images):
        return self.inner.eval(images)


def test_augmentation_sees_the_drawn_images_and_their_epoch(slice_data):
    torch.manual_seed(0)
    augmentation = RecordingAugmentation(slice_data.train_images)
    model = build_model("tf_cnn", 10, 32)
    optimizer = build_optimizer("sgd", model.parameters(), lr=0.01)
    scheduler = build_schedule("constant", optimizer, 10, 4)
    settings = train_settings(steps=10, batch_size=64, log_every=5, eval_every=10,
                             progress=False, label_smoothing=0.1, tta="flip")
    train(Parts(augmentation, model, optimizer, scheduler, settings), slice_data, ListSink())
    assert [epoch for _, epoch in augmentation.calls] == [0] * 4 + [1] * 4 + [2] * 2
    for epoch in (0, 1):  # 256 images in batches of 64: each epoch draws every image once
        drawn = torch.cat([idx for idx, e in augmentation.calls if e == epoch])
        assert torch.equal(drawn.sort().values, torch.arange(256))


def test_the_log_window_buffer_stays_small_whatever_log_every(monkeypatch):
    monkeypatch.setattr(_SpeedWindow, "CHUNK", 4)  # folds every 4 steps
    losses = [2.0, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    window = _SpeedWindow(batch_size=8, log_every=10**12, device=torch.device("cpu"))
    assert window.losses.numel() == 4
    for step, loss in enumerate(losses[:6], start=1):
        window.add(torch.tensor(loss), lr=0.1 * step)
    window.pause()
    saved = window.state_dict()  # mid-window, after one fold
    resumed = _SpeedWindow(batch_size=8, log_every=10**12, device=torch.device("cpu"))
    resumed.load_state_dict(saved)
    for each in (window, resumed):
        each.resume()
        for step, loss in enumerate(losses[6:], start=7):
            each.add(torch.tensor(loss), lr=0.1 * step)
        mean, _, _ = each.close()
        assert mean == math.fsum(losses) / 10 and each.first_step == 11
        assert each.losses.numel() == 4


def test_a_non_finite_loss_in_an_earlier_chunk_names_its_step_and_lr(monkeypatch):
    monkeypatch.setattr(_SpeedWindow, "CHUNK", 4)
    window = _SpeedWindow(batch_size=8, log_every=100, device=torch.device("cpu"))
    for step in range(1, 11):
        window.add(torch.tensor(float("nan") if step == 3 else 1.0), lr=float(step))
    with pytest.raises(NonFiniteLoss) as diverged:
        window.check_finite()
    assert (diverged.value.step, diverged.value.lr) == (3, 3.0)
    window.close()
    assert window.diverged is not None and window.diverged.step == 3
