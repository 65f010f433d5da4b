"""The training step, from drawn indices to the optimizer's update, with the speed options
applied."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from cifar_exp.models import build_model, regularization_loss
from cifar_exp.speed import resolve_amp
from cifar_exp.training.step import TrainingStep
from tests.conftest import made_of

CPU = torch.device("cpu")


def drawn(labels: torch.Tensor) -> torch.Tensor:
    """The indices that draw a batch maker's whole batch, in order."""
    return torch.arange(labels.numel(), device=labels.device)


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("tf_cnn", 10, 24)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def batch():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(16, 3, 24, 24, generator=generator),
            torch.randint(0, 10, (16,), generator=generator))


def test_frozen_parameters_get_no_update():
    inputs, labels = batch()
    model, _ = model_and_optimizer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    step = TrainingStep(model, optimizer, made_of(inputs, labels), CPU)
    step(drawn(labels), 0)  # a first step fills the momentum buffers
    frozen = model.conv1.bias.detach().clone()
    other = model.conv1.weight.detach().clone()
    step(drawn(labels), 0, frozen=[model.conv1.bias])
    assert torch.equal(model.conv1.bias, frozen)  # neither momentum nor decay moved it
    assert not torch.equal(model.conv1.weight, other)


def test_fp32_step_is_the_plain_step():
    inputs, labels = batch()
    model, optimizer = model_and_optimizer()
    loss = TrainingStep(model, optimizer, made_of(inputs, labels), CPU)(drawn(labels), 0)
    reference, reference_optimizer = model_and_optimizer()
    expected = F.cross_entropy(reference(inputs), labels) + regularization_loss(reference)
    reference_optimizer.zero_grad()
    expected.backward()
    reference_optimizer.step()
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected.detach())
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_low_precision_keeps_fp32_weights_and_learns(amp):
    inputs, labels = batch()
    model, optimizer = model_and_optimizer()
    step = TrainingStep(model, optimizer, made_of(inputs, labels), CPU, amp=amp)
    assert step.scaler.is_enabled() == (amp == "fp16")
    losses = [step(drawn(labels), 0).item() for _ in range(15)]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0]


def test_graphs_of_a_finished_step_go_with_it():
    """No reference cycle between the step and its graphs: their GPU memory is freed when
    the step goes, e.g. between the jobs of an in-process sweep, not at a later collection."""
    model, _ = model_and_optimizer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    step = TrainingStep(model, optimizer, made_of(*batch()), CPU,
                        cuda_graph=True)  # built only: nothing replays
    graphs = weakref.ref(step.graphs)
    gc.disable()
    try:
        del step
        assert graphs() is None
    finally:
        gc.enable()


@pytest.mark.slow
def test_compiled_step_matches_eager():
    inputs, labels = batch()
    model, optimizer = model_and_optimizer()
    compiled = TrainingStep(model, optimizer, made_of(inputs, labels), CPU,
                            compile_mode="default")
    eager_model, eager_optimizer = model_and_optimizer()
    eager = TrainingStep(eager_model, eager_optimizer, made_of(inputs, labels), CPU)
    for _ in range(3):
        torch.testing.assert_close(compiled(drawn(labels), 0), eager(drawn(labels), 0),
                                   rtol=1e-4, atol=1e-4)


def test_label_smoothing_mixes_in_the_uniform_target():
    inputs, labels = batch()
    model, optimizer = model_and_optimizer()
    with torch.no_grad():
        logits = model(inputs)
        penalty = regularization_loss(model)
    smoothed = TrainingStep(model, optimizer, made_of(inputs, labels), CPU,
                            label_smoothing=0.2)(drawn(labels), 0)
    log_probs = logits.log_softmax(1)
    hard = F.nll_loss(log_probs, labels)
    uniform = -log_probs.mean(1).mean()  # cross-entropy against 1/10 for every class
    torch.testing.assert_close(smoothed, 0.8 * hard + 0.2 * uniform + penalty)
    assert not torch.allclose(smoothed, hard + penalty)


def test_label_smoothing_keeps_confident_logits_from_zero_loss():
    logits = torch.tensor([[50.0] + [0.0] * 9])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(logits[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    label = torch.tensor([0])
    batches = made_of(torch.zeros(1, 1), label)
    plain = TrainingStep(model, optimizer, batches, CPU)(drawn(label), 0)
    smoothed = TrainingStep(model, optimizer, batches, CPU, label_smoothing=0.1)(drawn(label), 0)
    assert plain < 1e-6
    # 0.1 of the target spread over 10 classes: 9 of them cost ~50 nats each, x 0.01.
    assert smoothed == pytest.approx(0.01 * 9 * 50, rel=1e-3)


@pytest.mark.gpu
def test_bf16_step_on_the_gpu_keeps_fp32_weights_and_learns():
    cuda = torch.device("cuda")
    assert resolve_amp("auto", cuda) == "bf16"
    inputs, labels = (tensor.to(cuda) for tensor in batch())
    model, optimizer = model_and_optimizer()
    model.to(cuda)
    step = TrainingStep(model, optimizer, made_of(inputs, labels), cuda, amp="bf16")
    losses = [step(drawn(labels), 0).item() for _ in range(30)]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0]
