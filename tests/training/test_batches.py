"""On-device batch sampling (a seeded permutation per epoch) and the data path that makes a
step's batch of the drawn indices."""

from __future__ import annotations

import pytest
import torch

from cifar_exp.augment import build_augmentation, epoch_key
from cifar_exp.training.batches import BatchMaker, EpochSampler
from cifar_exp.world import World


def make(num_items: int, batch_size: int, seed: int = 0) -> EpochSampler:
    return EpochSampler(num_items, batch_size, torch.Generator().manual_seed(seed),
                        torch.device("cpu"))


def test_each_epoch_visits_every_item_once_and_drops_the_remainder():
    sampler = make(10, 3)
    first_epoch = torch.cat([sampler.next() for _ in range(3)])
    assert first_epoch.unique().numel() == 9  # 3 full batches, 1 item left over
    assert sampler.epoch == 0
    second = sampler.next()
    assert sampler.epoch == 1 and second.shape == (3,)


def test_the_last_batch_of_each_epoch_is_marked():
    sampler = make(10, 3)
    ended = []
    for _ in range(7):
        sampler.next()
        ended.append((sampler.epoch, sampler.epoch_ended))
    assert ended == [(0, False), (0, False), (0, True), (1, False), (1, False), (1, True),
                     (2, False)]


def test_epochs_are_shuffled_differently():
    sampler = make(100, 100)
    assert not torch.equal(sampler.next(), sampler.next())


def test_same_seed_same_batches():
    a, b = make(50, 8, seed=3), make(50, 8, seed=3)
    for _ in range(20):
        assert torch.equal(a.next(), b.next())


def test_state_continues_the_walk_across_epochs():
    walked = make(50, 8, seed=3)
    for _ in range(7):  # into the second epoch
        walked.next()
    state, generator_state = walked.state_dict(), walked.generator.get_state()
    resumed = make(50, 8, seed=99)
    resumed.load_state_dict(state)
    resumed.generator.set_state(generator_state)
    assert resumed.epoch == walked.epoch == 1
    for _ in range(20):
        assert torch.equal(resumed.next(), walked.next())


def test_state_of_another_data_set_is_refused():
    with pytest.raises(ValueError, match="sampler state walks 50 items, not 60"):
        make(60, 8).load_state_dict(make(50, 8).state_dict())


def test_a_batch_is_the_drawn_images_augmented_with_their_labels(cifar10):
    augmentation = build_augmentation("crop_flip", cifar10.train_images)
    generator = torch.Generator().manual_seed(3)
    batches = BatchMaker(cifar10, augmentation, generator, torch.channels_last)
    indices = torch.tensor([5, 0, 49_999, 7])
    inputs, labels = batches(indices, epoch=0)
    twin = torch.Generator().manual_seed(3)
    expected = augmentation.train(cifar10.train_images[indices], twin, indices, 0)
    assert torch.equal(inputs, expected) and torch.equal(labels, cifar10.train_labels[indices])
    assert inputs.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(generator.get_state(), twin.get_state())  # the same draws, no more


def test_a_rank_gets_its_slice_of_the_global_batch(cifar10):
    augmentation = build_augmentation("none", cifar10.train_images)
    indices = torch.arange(8)
    whole, whole_labels = BatchMaker(cifar10, augmentation, torch.Generator(),
                                     torch.contiguous_format)(indices, 0)
    inputs, labels = BatchMaker(cifar10, augmentation, torch.Generator(),
                                torch.contiguous_format, World(rank=1, size=2))(indices, 0)
    assert torch.equal(inputs, whole[4:]) and torch.equal(labels, whole_labels[4:])


@pytest.mark.parametrize("name,options,keys", [
    ("tf_distort", {}, [0, 0, 0]),
    ("none", {}, [0, 0, 0]),
    ("crop_flip", {}, [0, 0, 0]),
    ("crop_flip", {"alternating_flip": True}, [0, 1, 0]),  # flips differ by parity
])
def test_the_epoch_key_says_what_of_the_epoch_a_batch_depends_on(cifar10, name, options, keys):
    augmentation = build_augmentation(name, cifar10.train_images[:100], **options)
    batches = BatchMaker(cifar10, augmentation, torch.Generator(), torch.contiguous_format)
    assert [batches.epoch_key(epoch) for epoch in (4, 5, 6)] == keys


def test_an_augmentation_that_does_not_say_depends_on_the_epoch_itself():
    class Shifting:  # a user's augmentation without epoch_key
        image_size = 32

    assert [epoch_key(Shifting(), epoch) for epoch in (0, 1, 7)] == [0, 1, 7]
