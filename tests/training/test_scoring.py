"""Scoring sees every test image exactly once, also when sharded over processes, and
reports each score by name; test-time augmentation averages logits; the predicted class of
every image comes back from the same pass, on every rank."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cifar_exp.augment import build_augmentation
from cifar_exp.training.scoring import (
    METRICS,
    score,
    score_with_predictions,
    tta_logits,
    tta_views,
)


class ConstantClassifier(torch.nn.Module):
    """Always answers class 3 with logits (0, ..., 0, 1 at class 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 3] = 1.0
        return logits


@pytest.mark.parametrize("batch_size", [500, 3000, 10_000])
def test_whole_test_set_exactly_once(cifar10, batch_size):
    augmentation = build_augmentation("tf_distort", cifar10.train_images)
    scores = score(ConstantClassifier(), augmentation, cifar10.test_images,
                   cifar10.test_labels, batch_size)
    precision, loss = scores["precision"], scores["test_loss"]
    assert precision == 0.1  # 1,000 of the 10,000 test images are cats
    # These logits' cross-entropy is log(9 + e) - 1 for the cats, log(9 + e) for the rest.
    expected = math.log(9 + math.e) - 0.1
    assert loss == pytest.approx(expected, rel=1e-6)


def test_scores_are_named_as_metrics_are_logged():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    images, labels = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8), torch.arange(20) % 10
    scores = score(model, build_augmentation("none", images), images, labels, batch_size=8)
    assert list(scores) == list(METRICS) == ["precision", "test_loss", "precision_top5"]
    assert all(isinstance(value, float) for value in scores.values())


class RankedLogits(torch.nn.Module):
    """Logits that rank the classes of the batch's image i as i, i+1, i+2, ... (mod the
    classes), whatever its pixels: its label is among the top k when it is one of those k."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = torch.arange(x.shape[0])[:, None]
        rank = (torch.arange(self.classes)[None, :] - first) % self.classes
        return -rank.float()


@pytest.mark.parametrize("classes,top5", [(10, 0.5), (3, 1.0)])
def test_top5_precision_counts_the_label_among_the_five_highest_logits(classes, top5):
    # 10 images, each labelled with the class it ranks 0th, 1st, ... 9th (mod the classes).
    # With 10 classes the labels ranked 0-4 count: 5 of 10. With 3, top-5 is every class.
    count = 10
    images = torch.randint(0, 256, (count, 3, 4, 4), dtype=torch.uint8)
    labels = (torch.arange(count) * 2) % classes  # image i's label ranks (i mod classes)th
    scores = score(RankedLogits(classes), build_augmentation("none", images), images, labels,
                   batch_size=count)  # one batch: RankedLogits numbers the images in it
    assert scores["precision_top5"] == top5
    assert scores["precision"] == (labels == torch.arange(count) % classes).sum().item() / count


def test_evaluation_restores_training_mode(cifar10):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 24 * 24, 10))
    augmentation = build_augmentation("tf_distort", cifar10.train_images)
    model.train()
    score(model, augmentation, cifar10.test_images[:100], cifar10.test_labels[:100])
    assert model.training


def small_convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.LazyLinear(10)).eval()


def test_tta_averages_the_flipped_and_shifted_logits():
    model = small_convnet()
    x = torch.randn(5, 3, 32, 32)
    model(x)  # materialize the lazy layer
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    down_right, up_left = padded[:, :, :32, :32], padded[:, :, 2:, 2:]

    def mirrored(images):
        return (model(images) + model(images.flip(-1))) / 2

    with torch.no_grad():
        torch.testing.assert_close(tta_logits(model, x, "none"), model(x))
        torch.testing.assert_close(tta_logits(model, x, "flip"), mirrored(x))
        # airbench's level 2: half on the image and its mirror, half on the shifted pairs.
        expected = mirrored(x) / 2 + (mirrored(down_right) + mirrored(up_left)) / 4
        torch.testing.assert_close(tta_logits(model, x, "flip_translate"), expected)
        views = tta_views(x, "flip_translate")
        assert len(views) == 6 and sum(weight for weight, _ in views) == 1.0
    with pytest.raises(ValueError, match="unknown test-time augmentation 'mirror'"):
        tta_views(x, "mirror")


def test_evaluate_with_tta_scores_the_averaged_logits(cifar10):
    model = small_convnet()
    augmentation = build_augmentation("crop_flip", cifar10.train_images)
    images, labels = cifar10.test_images[:200], cifar10.test_labels[:200]
    with torch.no_grad():
        logits = tta_logits(model, augmentation.eval(images), "flip_translate")
    scores = score(model, augmentation, images, labels, batch_size=64, tta="flip_translate")
    precision, loss = scores["precision"], scores["test_loss"]
    assert precision == (logits.argmax(1) == labels).sum().item() / 200
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    untransformed = score(model, augmentation, images, labels, tta="none")
    assert (untransformed["precision"], untransformed["test_loss"]) != (precision, loss)


def test_the_predictions_come_from_the_same_pass_as_the_scores(cifar10):
    model = small_convnet()
    augmentation = build_augmentation("crop_flip", cifar10.train_images)
    images, labels = cifar10.test_images[:130], cifar10.test_labels[:130]
    with torch.no_grad():
        logits = tta_logits(model, augmentation.eval(images), "flip")
    scores, predicted = score_with_predictions(model, augmentation, images, labels,
                                               batch_size=64, tta="flip")  # 64 + 64 + 2
    assert torch.equal(predicted, logits.argmax(1))
    assert scores == score(model, augmentation, images, labels, batch_size=64, tta="flip")
    assert scores["precision"] == (predicted == labels).sum().item() / 130


def _evaluate_as_rank(rank: int, world_size: int, folder: str, images: torch.Tensor,
                      labels: torch.Tensor, augmentation) -> None:
    """One process of a gloo group: evaluate its part, save what it got back."""
    import torch.distributed as dist

    from cifar_exp.world import World

    dist.init_process_group("gloo", init_method=f"file://{folder}/group", rank=rank,
                            world_size=world_size)
    model = batchnorm_convnet()
    if rank:  # this rank's running statistics drifted from its own slices of the batches
        model[1].running_mean += 0.5
    result = score_with_predictions(model, augmentation, images, labels, batch_size=64,
                                    tta="flip", world=World(rank, world_size))
    torch.save(tuple(result), f"{folder}/rank{rank}.pt")  # plain: torch.load's safe types
    dist.destroy_process_group()


def batchnorm_convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 22 * 22, 10))
    model[1].running_mean.uniform_(-0.2, 0.2)
    return model


def test_sharded_evaluation_over_two_processes_matches_one(cifar10, tmp_path):
    # An odd count: the parts differ by one image, and every image is still scored once.
    images, labels = cifar10.test_images[:301], cifar10.test_labels[:301]
    augmentation = build_augmentation("tf_distort", cifar10.train_images)
    torch.multiprocessing.spawn(_evaluate_as_rank, args=(2, str(tmp_path), images, labels,
                                                         augmentation), nprocs=2)
    alone, predicted = score_with_predictions(batchnorm_convnet(), augmentation, images,
                                              labels, batch_size=64, tta="flip")
    for rank in (0, 1):  # every rank gets the totals, with rank 0's BatchNorm statistics
        scores, on_rank = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(on_rank, predicted)  # and every image's prediction, in order
        precision, loss = scores["precision"], scores["test_loss"]
        assert precision == pytest.approx(alone["precision"], abs=1e-12)
        assert loss == pytest.approx(alone["test_loss"], rel=1e-6)
        assert scores["precision_top5"] == pytest.approx(alone["precision_top5"], abs=1e-12)


@pytest.mark.gpu
def test_gpu_evaluation_matches_the_cpu(cifar10):
    model = small_convnet()
    augmentation = build_augmentation("tf_distort", cifar10.train_images)
    images, labels = cifar10.test_images[:2000], cifar10.test_labels[:2000]
    on_cpu = score(model, augmentation, images, labels, tta="flip_translate")
    cuda = torch.device("cuda")
    on_gpu = score(model.to(cuda), augmentation, images.to(cuda), labels.to(cuda),
                   tta="flip_translate")
    # A few images may tie-break.
    assert on_gpu["precision"] == pytest.approx(on_cpu["precision"], abs=0.002)
    assert on_gpu["test_loss"] == pytest.approx(on_cpu["test_loss"], rel=1e-3)
