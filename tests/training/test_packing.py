"""Packed training: members that step together learn what each learns alone."""

from __future__ import annotations

import threading

import pytest
import torch

from cifar_exp.augment import build_augmentation
from cifar_exp.data import CifarData
from cifar_exp.errors import NonFiniteLoss
from cifar_exp.models import build_model
from cifar_exp.optim import build_optimizer
from cifar_exp.schedules import build_schedule
from cifar_exp.training.loop import train
from cifar_exp.training.packing import Pack
from cifar_exp.training.parts import Parts
from tests.conftest import train_settings

# vmap runs the members' convolutions as one batched convolution, which sums in another
# order than a lone member's: float32 rounding, compounded over a few Adam steps.
TOLERANCE = 1e-4


class ListSink:
    def __init__(self) -> None:
        self.losses: list[float] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "loss" in metrics:
            self.losses.append(metrics["loss"])


@pytest.fixture(scope="module")
def slice_data(cifar10) -> CifarData:
    return CifarData(cifar10.train_images[:512], cifar10.train_labels[:512],
                     cifar10.test_images[:200], cifar10.test_labels[:200], cifar10.classes)


def member(data: CifarData, seed: int, lr: float = 1e-3, model: str = "tf_cnn",
           steps: int = 6, optimizer: str = "adam") -> Parts:
    settings = train_settings(steps=steps, batch_size=64, seed=seed, log_every=2,
                             eval_every=steps, eval_batch_size=200, progress=False)
    torch.manual_seed(seed)
    augmentation = build_augmentation("tf_distort", data.train_images)
    network = build_model(model, 10, augmentation.image_size)
    built_optimizer = build_optimizer(optimizer, network.parameters(), lr=lr)
    scheduler = build_schedule("constant", built_optimizer, steps, 512 / 64)
    return Parts(augmentation, network, built_optimizer, scheduler, settings=settings)


def train_packed(experiments: list[Parts], data: CifarData) -> list[object]:
    """Each member in its own thread, as the packed launcher runs them; returns each one's
    (sink, result or the exception it raised)."""
    pack = Pack(len(experiments))
    outcomes: list[object] = [None] * len(experiments)

    def run(index: int) -> None:
        sink = ListSink()
        try:
            outcomes[index] = (sink, train(experiments[index], data, sink,
                                           make_step=pack.step_maker(index)))
        except Exception as error:
            outcomes[index] = (sink, error)
        finally:
            pack.leave()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(experiments))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_three_seeds_packed_learn_what_each_learns_alone(slice_data):
    seeds = (0, 1, 2)
    alone = []
    for seed in seeds:
        parts, sink = member(slice_data, seed), ListSink()
        result = train(parts, slice_data, sink)
        alone.append((parts, sink, result))
    packed = [member(slice_data, seed) for seed in seeds]
    outcomes = train_packed(packed, slice_data)
    for (parts, sink, result), together, (packed_sink, packed_result) in zip(
            alone, packed, outcomes, strict=True):
        assert len(sink.losses) == len(packed_sink.losses) == 3
        assert packed_sink.losses == pytest.approx(sink.losses, rel=TOLERANCE)
        for name, weight in parts.model.state_dict().items():
            torch.testing.assert_close(together.model.state_dict()[name], weight,
                                       rtol=TOLERANCE, atol=TOLERANCE, msg=name)
        assert packed_result.precision == pytest.approx(result.precision, abs=0.01)
    # Different seeds really differ: equality above is not of three copies of one run.
    assert outcomes[0][0].losses != outcomes[1][0].losses


def test_a_diverging_member_fails_alone_and_the_others_finish(slice_data):
    members = [member(slice_data, 0), member(slice_data, 1, lr=1e30), member(slice_data, 2)]
    outcomes = train_packed(members, slice_data)
    assert isinstance(outcomes[1][1], NonFiniteLoss)
    for index in (0, 2):
        assert outcomes[index][1].precision > 0


def test_a_batchnorm_network_with_frozen_weights_packs_too(slice_data):
    """airbench: BatchNorm running statistics (buffers) and a whitening layer that never
    trains. With SGD: Adam's first steps move each weight by about lr whatever the size of
    its gradient, which turns the rounding of a near-zero gradient into a visible step."""
    options = {"model": "airbench", "steps": 2, "optimizer": "sgd", "lr": 0.01}
    alone = member(slice_data, 0, **options)
    train(alone, slice_data, ListSink())
    packed = [member(slice_data, 0, **options), member(slice_data, 1, **options)]
    outcomes = train_packed(packed, slice_data)
    assert all(not isinstance(outcome[1], Exception) for outcome in outcomes), outcomes
    for name, weight in alone.model.state_dict().items():
        torch.testing.assert_close(packed[0].model.state_dict()[name], weight,
                                   rtol=TOLERANCE, atol=TOLERANCE, msg=name)
