"""One step for several members at once: each member's update is the one it takes alone."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from cifar_exp.models import build_model, regularization_loss
from cifar_exp.training.stacked_step import Member, signature, stacked_step

CPU = torch.device("cpu")


def lone_step(model, inputs, labels, label_smoothing):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(inputs), labels, label_smoothing=label_smoothing)
    loss = loss + regularization_loss(model)
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_each_member_takes_its_own_lone_step_with_its_own_loss_settings():
    torch.manual_seed(0)
    models = [build_model("tf_cnn", 10, 24) for _ in range(2)]
    inputs, labels = torch.randn(2, 16, 3, 24, 24), torch.randint(0, 10, (2, 16))
    smoothing = (0.0, 0.2)  # members may differ in their loss settings
    alone = [copy.deepcopy(model) for model in models]
    lone_losses = [lone_step(alone[i], inputs[i], labels[i], smoothing[i]) for i in range(2)]

    members = [Member(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      torch.amp.GradScaler("cpu", enabled=False), smoothing[i], inputs[i],
                      labels[i]) for i, model in enumerate(models)]
    losses = stacked_step(members, CPU, "fp32")
    for i in range(2):
        torch.testing.assert_close(losses[i], lone_losses[i], rtol=1e-5, atol=1e-6)
        for name, weight in alone[i].state_dict().items():
            torch.testing.assert_close(models[i].state_dict()[name], weight, rtol=1e-5,
                                       atol=1e-6, msg=name)


def test_frozen_parameters_of_a_member_keep_their_values():
    torch.manual_seed(0)
    model = build_model("tf_cnn", 10, 24)
    before = model.conv1.weight.detach().clone()
    member = Member(model, torch.optim.SGD(model.parameters(), lr=0.1),
                    torch.amp.GradScaler("cpu", enabled=False), 0.0,
                    torch.randn(8, 3, 24, 24), torch.randint(0, 10, (8,)),
                    frozen=[model.conv1.weight])
    stacked_step([member], CPU, "fp32")
    assert torch.equal(model.conv1.weight, before)
    assert not torch.equal(model.conv2.weight.grad, torch.zeros_like(model.conv2.weight))


def test_networks_of_other_shapes_have_other_signatures():
    assert signature(build_model("tf_cnn", 10, 24)) == signature(build_model("tf_cnn", 10, 24))
    assert signature(build_model("tf_cnn", 10, 24)) != signature(build_model("tf_cnn", 100, 24))
