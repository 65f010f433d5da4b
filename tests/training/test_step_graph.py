"""The whole training step as CUDA graphs: the device learning rates, which graph a call
replays and the data path's fallback (on the CPU, a replay standing in for the graph), and
on a GPU the graphed steps, data path included, against the same steps run op by op."""

from __future__ import annotations

import pytest
import torch

from cifar_exp.augment import build_augmentation
from cifar_exp.data import CifarData
from cifar_exp.models import build_model
from cifar_exp.optim import build_optimizer
from cifar_exp.optim.groups import parameter_groups
from cifar_exp.schedules import build_schedule
from cifar_exp.training import step_graph
from cifar_exp.training.batches import BatchMaker
from cifar_exp.training.step import TrainingStep
from cifar_exp.training.step_graph import (
    MAX_GRAPHS,
    WARMUP_STEPS,
    CaptureFailed,
    DeviceLearningRates,
    StepGraphs,
)
from tests.conftest import made_of

CPU = torch.device("cpu")


def sgd_with_schedule(model: torch.nn.Module, steps: int):
    """Nesterov SGD with two groups (4x the lr for normalization layers) on a triangle
    schedule: every step has new lrs, different per group."""
    optimizer = build_optimizer("sgd", parameter_groups(model), lr=0.05, momentum=0.9,
                                nesterov=True, weight_decay=5e-4, norm_lr_scale=4.0, fused=True)
    return optimizer, build_schedule("triangle", optimizer, steps, 10.0)


def graphed_and_eager_on_the_gpu(model_name: str, with_schedule, steps: int = 10,  # noqa: ANN001
                                 compile_mode: str = "none",
                                 memory_format: torch.memory_format = torch.contiguous_format
                                 ) -> dict[bool, tuple[torch.Tensor, list[torch.Tensor]]]:
    """The same `steps` training steps on a CUDA device, op by op (False) and graphed
    (True, one capture): each way's losses and final parameters. `with_schedule` makes the
    optimizer and its schedule for the model."""
    cuda = torch.device("cuda")
    generator = torch.Generator(cuda).manual_seed(1)
    inputs = torch.randn(steps * 32, 3, 24, 24, device=cuda, generator=generator)
    labels = torch.randint(0, 10, (steps * 32,), device=cuda, generator=generator)
    runs = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = build_model(model_name, 10, 24).to(cuda, memory_format=memory_format)
        optimizer, schedule = with_schedule(model, steps)
        step = TrainingStep(model, optimizer, made_of(inputs, labels, memory_format), cuda,
                            amp="fp32", compile_mode=compile_mode, cuda_graph=graphed)
        losses = []
        for index in range(steps):  # a new batch each step
            losses.append(step(torch.arange(index * 32, (index + 1) * 32, device=cuda),
                               0).clone())
            schedule.step()
        runs[graphed] = (torch.stack(losses), [p.detach().clone() for p in model.parameters()])
        if graphed:
            assert step.graphs is not None and step.graphs.captures == 1
    return runs


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
    runs = graphed_and_eager_on_the_gpu(model_name, sgd_with_schedule,
                                        compile_mode=compile_mode)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)
    for graphed_param, eager_param in zip(runs[True][1], runs[False][1], strict=True):
        torch.testing.assert_close(graphed_param, eager_param, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_a_new_frozen_set_captures_a_new_graph_that_leaves_it_alone():
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("tf_cnn", 10, 24).to(cuda)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    inputs = torch.randn(32, 3, 24, 24, device=cuda)
    labels = torch.randint(0, 10, (32,), device=cuda)
    step = TrainingStep(model, optimizer, made_of(inputs, labels), cuda, amp="bf16",
                        cuda_graph=True)
    indices = torch.arange(32, device=cuda)  # the same batch each step
    for _ in range(WARMUP_STEPS + 2):
        step(indices, 0)
    bias, weight = model.conv1.bias.detach().clone(), model.conv1.weight.detach().clone()
    losses = [step(indices, 0, frozen=[model.conv1.bias]).item() for _ in range(3)]
    assert step.graphs is not None and step.graphs.captures == 2
    assert torch.equal(model.conv1.bias, bias)
    assert not torch.equal(model.conv1.weight, weight)
    assert losses[-1] < losses[0]  # the same batch again and again: it is learned


class ReplayedEagerly:
    """Stands in for a CUDA graph on the CPU: each replay runs the captured work again on
    the graph's buffers and writes its result where the graph's loss lives."""

    def __init__(self, work, buffers, loss) -> None:
        self.work, self.buffers, self.loss = work, buffers, loss

    def replay(self) -> None:
        self.loss.copy_(self.work(*self.buffers))


@pytest.fixture
def graphs_on_the_cpu(monkeypatch):
    """StepGraphs with its side stream and capture replaced for the CPU; the generators each
    capture registered are listed."""
    registered = []

    def capture(self, arguments, work, generator):
        buffers = tuple(argument.clone() for argument in arguments)
        registered.append(generator)
        loss = torch.zeros((), dtype=torch.float64)  # batch_summary sums in float64
        return step_graph._Captured(ReplayedEagerly(work, buffers, loss), buffers, loss)

    monkeypatch.setattr(StepGraphs, "_capture", capture)
    monkeypatch.setattr(StepGraphs, "_on_side_stream", lambda self, work: work())
    return registered


def batch_summary(inputs: torch.Tensor, labels: torch.Tensor, frozen=()) -> torch.Tensor:
    """A stand-in model step whose "loss" tells the batch it was given."""
    return inputs.double().sum() + labels.double().sum() * 1e3


def summarizing_step(batches: BatchMaker, optimizer) -> TrainingStep:
    """A graphed TrainingStep with `batches` as its data path and batch_summary standing in
    for its model step."""
    step = TrainingStep(torch.nn.Linear(2, 2), optimizer, batches, CPU, cuda_graph=True)
    step.eager = batch_summary
    return step


def test_graphs_wrap_any_function_of_tensors_one_graph_per_key(graphs_on_the_cpu):
    """No batches here: the work is a function of its tensor arguments, run op by op for
    the warm-up, then replayed from the graph of its key on each call's arguments."""
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    graphs = StepGraphs(optimizer, CPU)
    generator = torch.Generator()

    def doubled_sum(values: torch.Tensor) -> torch.Tensor:
        return values.double().sum() * 2

    for call in range(WARMUP_STEPS + 4):
        values = torch.arange(call, call + 3)
        key = call % 2 if call >= WARMUP_STEPS else "warm-up"
        assert graphs(key, doubled_sum, (values,), generator) == doubled_sum(values), call
    assert graphs.eager_steps == WARMUP_STEPS and graphs.captures == 2
    assert graphs_on_the_cpu == [generator, generator]


def test_a_capture_that_fails_says_why(graphs_on_the_cpu, monkeypatch):
    def refuse(self, arguments, work, generator):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StepGraphs, "_capture", refuse)
    graphs = StepGraphs(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), CPU)
    graphs.eager_steps = WARMUP_STEPS
    with pytest.raises(CaptureFailed, match="operation not permitted") as failed:
        graphs("key", torch.sum, (torch.ones(2),))
    assert isinstance(failed.value.__cause__, RuntimeError) and graphs.captures == 0


def twin_batch_makers(data: CifarData, augmentation, seed: int) -> tuple[BatchMaker, BatchMaker]:
    """Two data paths alike, their generators seeded alike: one for the graphs, one to
    check against op by op."""
    return tuple(BatchMaker(data, augmentation, torch.Generator().manual_seed(seed),
                            torch.contiguous_format) for _ in range(2))


def test_graphed_batches_replay_the_data_path_on_each_steps_indices(cifar10,
                                                                      graphs_on_the_cpu):
    data = CifarData(cifar10.train_images[:512], cifar10.train_labels[:512],
                     cifar10.test_images[:8], cifar10.test_labels[:8], cifar10.classes)
    augmentation = build_augmentation("crop_flip", data.train_images, alternating_flip=True)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    made, twin = twin_batch_makers(data, augmentation, seed=1)
    graphed = summarizing_step(made, optimizer)
    order = torch.randperm(512, generator=torch.Generator().manual_seed(2))
    epochs = [0] * 6 + [1] * 3 + [2] * 3  # warm-up steps, then three epochs
    for step, epoch in enumerate(epochs):
        indices = order[step * 16:(step + 1) * 16]
        loss = graphed(indices, epoch).clone()
        assert loss == batch_summary(*twin(indices, epoch)), step  # the same draws, in turn
    assert graphed.graphs.captures == 2  # one graph per flip parity, reused in epoch 2
    assert graphs_on_the_cpu == [made.generator, made.generator]  # each draws from the trainer's


def test_a_new_frozen_set_or_parity_captures_a_graph_and_the_oldest_goes(cifar10,
                                                                         graphs_on_the_cpu):
    augmentation = build_augmentation("crop_flip", cifar10.train_images[:64],
                                      alternating_flip=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    made = BatchMaker(cifar10, augmentation, torch.Generator(), torch.contiguous_format)
    graphed = summarizing_step(made, optimizer)
    graphs = graphed.graphs
    indices = torch.arange(8)
    for _ in range(WARMUP_STEPS):
        graphed(indices, 0)
    assert graphs.captures == 0
    frozen_sets = [(), (model.bias,), (model.weight,)]
    for frozen in frozen_sets:  # 3 frozen sets x 2 parities = 6 graphs
        for epoch in (0, 1):
            graphed(indices, epoch, frozen)
    assert graphs.captures == 6 and len(graphs._captured) == MAX_GRAPHS
    graphed(indices, 1, (model.weight,))  # among the kept ones: replayed
    assert graphs.captures == 6
    graphed(indices, 0, ())  # the first, dropped: captured again
    assert graphs.captures == 7 and len(graphs._captured) == MAX_GRAPHS


@pytest.mark.gpu
def test_graphed_batches_draw_and_train_as_the_eager_ones(monkeypatch, cifar10):
    """The data path inside the step's graph: the same augmentation draws (the trainer's
    generator ends in the same state), the same losses and weights as op by op, across an
    epoch boundary of alternating flips."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    cuda, steps = torch.device("cuda"), 12
    data = cifar10.to(cuda)
    runs = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        augmentation = build_augmentation("crop_flip", data.train_images, alternating_flip=True,
                                          cutout=8)
        model = build_model("resnet9", 10, 32).to(cuda)
        optimizer, schedule = sgd_with_schedule(model, steps)
        generator = torch.Generator(cuda).manual_seed(1)
        made = BatchMaker(data, augmentation, generator, torch.channels_last)
        step = TrainingStep(model, optimizer, made, cuda, amp="fp32", cuda_graph=graphed)
        losses = []
        for index in range(steps):
            indices = torch.randint(0, 50_000, (64,), device=cuda, generator=generator)
            losses.append(step(indices, epoch=index // 6).clone())
            schedule.step()
        runs[graphed] = (torch.stack(losses), [p.detach().clone() for p in model.parameters()],
                         generator.get_state())
        if graphed:
            assert step.graphs is not None and step.graphs.captures == 2
    assert torch.equal(runs[True][2], runs[False][2])
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)
    for graphed_param, eager_param in zip(runs[True][1], runs[False][1], strict=True):
        torch.testing.assert_close(graphed_param, eager_param, rtol=1e-4, atol=1e-5)


def test_a_data_path_that_cannot_be_captured_runs_op_by_op_before_the_graph(
        cifar10, graphs_on_the_cpu, monkeypatch, caplog):
    capture = StepGraphs._capture

    def refuse_the_data_path(self, arguments, work, generator):
        if generator is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        return capture(self, arguments, work, generator)

    monkeypatch.setattr(StepGraphs, "_capture", refuse_the_data_path)
    augmentation = build_augmentation("tf_distort", cifar10.train_images[:64])
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    made, twin = twin_batch_makers(cifar10, augmentation, seed=4)
    graphed = summarizing_step(made, optimizer)
    for step in range(WARMUP_STEPS + 3):
        indices = torch.arange(step * 8, step * 8 + 8)
        assert graphed(indices, 0) == batch_summary(*twin(indices, 0)), step
    assert graphed.batches_outside == "operation not permitted when stream is capturing"
    assert graphed.graphs.captures == 1  # the step alone, once
    warnings = [r.message for r in caplog.records if "could not be captured" in r.message]
    assert len(warnings) == 1 and "it runs op by op, the step still as a graph" in warnings[0]


# --- muon: its whole step (Muon on the filters, fused SGD on the rest) can be captured ------


class TinyConvNet(torch.nn.Sequential):
    """Filters for Muon (3x3 and 1x1), conv and BatchNorm biases and a linear head for SGD."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                         torch.nn.GELU(), torch.nn.Conv2d(8, 16, 1), torch.nn.MaxPool2d(8),
                         torch.nn.Flatten(), torch.nn.Linear(16, 10, bias=False))


def muon_with_schedule(model: torch.nn.Module, steps: int):
    """fast94_muon's optimizer in small: Muon on the filters with normalization and weight
    decay, fused Nesterov SGD on the rest at two lrs, all on a schedule that changes every
    step."""
    optimizer = build_optimizer("muon", parameter_groups(model), lr=0.2, momentum=0.6,
                                weight_decay=0.01, ns_steps=3, normalize_filters=True,
                                sgd_lr=0.3, sgd_bias_lr=2.0, sgd_momentum=0.85,
                                sgd_weight_decay=1e-3, sgd_decoupled_weight_decay=True,
                                fused=True)
    return optimizer, build_schedule("triangle", optimizer, steps, 10.0)


@pytest.fixture
def graphs_on_the_cpu_with_device_lrs(monkeypatch):
    """As graphs_on_the_cpu, and each replay runs with the device lrs installed, as the
    graph was recorded: the optimizer reads its lrs from the tensors StepGraphs refills."""
    lr_types = []

    def capture(self, arguments, work, generator):
        buffers = tuple(argument.clone() for argument in arguments)
        lrs = self.lrs

        def recorded(*inputs):
            with lrs.installed():
                lr_types.append({type(group["lr"]) for group in lrs.optimizer.param_groups})
                return work(*inputs)

        loss = torch.zeros(())
        return step_graph._Captured(ReplayedEagerly(recorded, buffers, loss), buffers, loss)

    monkeypatch.setattr(StepGraphs, "_capture", capture)
    monkeypatch.setattr(StepGraphs, "_on_side_stream", lambda self, work: work())
    return lr_types


def test_graphed_muon_steps_train_as_the_eager_steps_on_the_cpu(
        graphs_on_the_cpu_with_device_lrs):
    steps = WARMUP_STEPS + 4
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(steps * 16, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (steps * 16,), generator=generator)
    runs = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = TinyConvNet().to(memory_format=torch.channels_last)
        optimizer, schedule = muon_with_schedule(model, steps)
        step = TrainingStep(model, optimizer, made_of(inputs, labels), CPU, cuda_graph=graphed)
        losses, lrs = [], []
        for index in range(steps):  # a new batch and new lrs each step
            losses.append(step(torch.arange(index * 16, (index + 1) * 16), 0).clone())
            lrs.append([group["lr"] for group in optimizer.param_groups])
            schedule.step()
        runs[graphed] = (torch.stack(losses), [p.detach().clone() for p in model.parameters()],
                         lrs)
        if graphed:
            assert step.graphs is not None and step.graphs.captures == 1
    assert graphs_on_the_cpu_with_device_lrs == [{torch.Tensor}] * (steps - WARMUP_STEPS)
    assert runs[True][2] == runs[False][2] and len({lr[0] for lr in runs[True][2]}) == steps
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-6, atol=1e-7)
    for graphed_param, eager_param in zip(runs[True][1], runs[False][1], strict=True):
        torch.testing.assert_close(graphed_param, eager_param, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_graphed_muon_step_trains_as_the_eager_step_on_the_gpu(monkeypatch):
    """The Muon step captured with torch.cuda.CUDAGraph (the trainer's StepGraphs), its
    lrs refilled each replay, against the same steps op by op."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    runs = graphed_and_eager_on_the_gpu("tf_cnn", muon_with_schedule,
                                        memory_format=torch.channels_last)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)
    for graphed_param, eager_param in zip(runs[True][1], runs[False][1], strict=True):
        torch.testing.assert_close(graphed_param, eager_param, rtol=1e-4, atol=1e-4)
