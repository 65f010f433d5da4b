"""The whole training step as CUDA graphs: the device learning rates (on the CPU), and on a
GPU the graphed steps against the same steps run op by op."""

from __future__ import annotations

import pytest
import torch

from cifar_exp.models import build_model
from cifar_exp.optim import build_optimizer
from cifar_exp.optim.groups import parameter_groups
from cifar_exp.schedules import build_schedule
from cifar_exp.step import TrainingStep
from cifar_exp.step_graph import WARMUP_STEPS, DeviceLearningRates

CPU = torch.device("cpu")


def sgd_with_schedule(model: torch.nn.Module, steps: int):
    """Nesterov SGD with two groups (4x the lr for normalization layers) on a triangle
    schedule: every step has new lrs, different per group."""
    optimizer = build_optimizer("sgd", parameter_groups(model), lr=0.05, momentum=0.9,
                                nesterov=True, weight_decay=5e-4, norm_lr_scale=4.0, fused=True)
    return optimizer, build_schedule("triangle", optimizer, steps, 10.0)


def test_device_lrs_carry_the_schedule_into_a_fused_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    twin.load_state_dict(model.state_dict())
    (optimizer, schedule), (twin_optimizer, twin_schedule) = (
        sgd_with_schedule(net, steps=6) for net in (model, twin))
    lrs = DeviceLearningRates(optimizer, CPU)
    inputs = torch.randn(16, 8)
    for _ in range(6):
        for net, opt in ((model, optimizer), (twin, twin_optimizer)):
            opt.zero_grad()
            net(inputs).square().mean().backward()
        lrs.refill()
        with lrs.installed():
            assert all(group["lr"] is tensor
                       for group, tensor in zip(optimizer.param_groups, lrs.tensors, strict=True))
            optimizer.step()
        twin_optimizer.step()
        schedule.step()
        twin_schedule.step()
        assert all(isinstance(group["lr"], float) for group in optimizer.param_groups)
    lrs.refill()
    scheduled = [group["lr"] for group in optimizer.param_groups]
    assert scheduled[1] == pytest.approx(4 * scheduled[0])
    assert [tensor.item() for tensor in lrs.tensors] == pytest.approx(scheduled)
    for ours, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_installed_lrs_declare_adam_capturable_and_restore_it():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    lrs = DeviceLearningRates(optimizer, CPU)
    lrs.refill()
    with lrs.installed():
        group = optimizer.param_groups[0]
        assert group["capturable"] and group["lr"] is lrs.tensors[0]
        assert group["lr"].item() == pytest.approx(1e-3)
    assert optimizer.param_groups[0]["capturable"] is False
    assert optimizer.param_groups[0]["lr"] == 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("model_name,compile_mode", [
    ("tf_cnn", "none"), ("resnet9", "none"), ("tf_cnn", "default")])
def test_graphed_steps_train_as_the_eager_steps(monkeypatch, model_name, compile_mode):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    cuda, steps = torch.device("cuda"), 10
    runs = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = build_model(model_name, 10, 24).to(cuda)
        optimizer, schedule = sgd_with_schedule(model, steps)
        step = TrainingStep(model, optimizer, cuda, "fp32", compile_mode, cuda_graph=graphed)
        generator = torch.Generator(cuda).manual_seed(1)
        losses = []
        for _ in range(steps):
            inputs = torch.randn(32, 3, 24, 24, device=cuda, generator=generator)
            labels = torch.randint(0, 10, (32,), device=cuda, generator=generator)
            losses.append(step(inputs, labels).clone())
            schedule.step()
        runs[graphed] = (torch.stack(losses), [p.detach().clone() for p in model.parameters()])
        if graphed:
            assert step.graphs is not None and step.graphs.captures == 1
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)
    for graphed_param, eager_param in zip(runs[True][1], runs[False][1], strict=True):
        torch.testing.assert_close(graphed_param, eager_param, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_a_new_frozen_set_captures_a_new_graph_that_leaves_it_alone():
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("tf_cnn", 10, 24).to(cuda)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    step = TrainingStep(model, optimizer, cuda, "bf16", cuda_graph=True)
    inputs = torch.randn(32, 3, 24, 24, device=cuda)
    labels = torch.randint(0, 10, (32,), device=cuda)
    for _ in range(WARMUP_STEPS + 2):
        step(inputs, labels)
    bias, weight = model.conv1.bias.detach().clone(), model.conv1.weight.detach().clone()
    losses = [step(inputs, labels, frozen=[model.conv1.bias]).item() for _ in range(3)]
    assert step.graphs is not None and step.graphs.captures == 2
    assert torch.equal(model.conv1.bias, bias)
    assert not torch.equal(model.conv1.weight, weight)
    assert losses[-1] < losses[0]  # the same batch again and again: it is learned
