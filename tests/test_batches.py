"""On-device batch sampling: a seeded permutation per epoch."""

from __future__ import annotations

import pytest
import torch

from cifar_exp.batches import EpochSampler


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
