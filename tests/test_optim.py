"""Optimizer builders and parameter groups."""

from __future__ import annotations

import io

import pytest
import torch

from cifar_exp.errors import ConfigError
from cifar_exp.optim import OPTIMIZERS, build_optimizer
from cifar_exp.optim.groups import parameter_groups


def params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3))]


def test_registered_optimizers():
    assert {"adam", "adamw", "sgd", "muon"} <= set(OPTIMIZERS.names())


def test_adam_defaults_are_the_tutorials():
    optimizer = build_optimizer("adam", params())
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.Adam)
    assert group["lr"] == 1e-3 and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8


def test_sgd_momentum_and_nesterov_options():
    optimizer = build_optimizer("sgd", params(), lr=0.05, momentum=0.8, nesterov=True)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.05 and group["momentum"] == 0.8 and group["nesterov"]


def test_adamw_decouples_weight_decay():
    optimizer = build_optimizer("adamw", params(), weight_decay=0.05, betas=[0.8, 0.99])
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.99)


def test_parameter_groups_are_accepted():
    groups = [{"params": params(), "weight_decay": 0.0}, {"params": params()}]
    optimizer = build_optimizer("sgd", groups, lr=0.1, weight_decay=5e-4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 5e-4]


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match=r"optimizer 'adam' has no option\(s\) \['momentum'\]"):
        build_optimizer("adam", params(), momentum=0.9)


class TinyNet(torch.nn.Module):
    """A conv with a bias, a BatchNorm with a frozen scale, a bias-free linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.norm.weight.requires_grad_(False)
        self.head = torch.nn.Linear(4, 2, bias=False)


def test_parameter_groups_split_normalization_layers_and_drop_frozen():
    net = TinyNet()
    others, norms = parameter_groups(net)
    assert others["params"] == [net.conv.weight, net.conv.bias, net.head.weight]
    assert norms["params"] == [net.norm.bias] and norms["normalization"]
    assert not others["normalization"]
    assert len(parameter_groups(torch.nn.Linear(2, 2))) == 1  # no empty group


def test_norm_lr_scale_and_coupled_weight_decay():
    net = TinyNet()
    optimizer = build_optimizer("sgd", parameter_groups(net), lr=0.1, weight_decay=5e-4,
                                norm_lr_scale=64.0)
    others, norms = optimizer.param_groups
    assert others["lr"] == 0.1 and norms["lr"] == pytest.approx(6.4)
    assert others["weight_decay"] == norms["weight_decay"] == 5e-4
    assert optimizer.defaults["lr"] == 0.1  # the configured lr, as the trainer reports it


def test_decoupled_weight_decay_is_the_same_decay_term_for_every_group():
    net = TinyNet()
    with torch.no_grad():
        net.norm.bias.fill_(1.0)
        net.conv.bias.fill_(1.0)
    optimizer = build_optimizer("sgd", parameter_groups(net), lr=1.5, momentum=0.0,
                                weight_decay=0.002, norm_lr_scale=64.0,
                                decoupled_weight_decay=True)
    others, norms = optimizer.param_groups
    assert others["weight_decay"] == pytest.approx(0.002 / 1.5)
    assert norms["weight_decay"] == pytest.approx(0.002 / 96)
    for p in net.parameters():  # a zero gradient: the step is the decay alone
        p.grad = torch.zeros_like(p)
    optimizer.step()
    # Each weight lost the same 0.2% whatever its group's lr (1.5 or 96).
    torch.testing.assert_close(net.conv.bias, torch.full((4,), 0.998))
    torch.testing.assert_close(net.norm.bias, torch.full((4,), 0.998))


def test_group_keys_override_the_options():
    groups = [{"params": params(), "lr": 0.01, "normalization": True}, {"params": params()}]
    optimizer = build_optimizer("sgd", groups, lr=0.1, weight_decay=0.1, norm_lr_scale=2.0,
                                decoupled_weight_decay=True)
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.1]
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([5.0, 1.0])


# --- muon: torch.optim.Muon on the conv filters, SGD on the rest ---------------------------


def muon_net() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    return net.to(memory_format=torch.channels_last)  # the trainer's layout: a 4-D stride


def set_gradients(net: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=generator)


def test_muon_puts_each_parameter_in_muon_or_sgd_once():
    net = muon_net()
    optimizer = build_optimizer("muon", parameter_groups(net), lr=0.24, sgd_lr=0.5,
                                sgd_bias_lr=2.0)
    filters, matrices, vectors = optimizer.param_groups
    assert filters["params"] == [net.conv.weight] and filters["lr"] == 0.24
    assert matrices["params"] == [net.head.weight] and matrices["lr"] == 0.5
    assert vectors["params"] == [net.conv.bias, net.norm.bias] and vectors["lr"] == 2.0
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters() if p.requires_grad)
    assert isinstance(optimizer.muon, torch.optim.Muon) and isinstance(optimizer.sgd,
                                                                        torch.optim.SGD)
    [matrix] = optimizer.muon.param_groups[0]["params"]
    assert matrix.shape == (4, 27)  # out x (in * kh * kw): torch's Muon takes 2-D only
    assert optimizer.defaults["lr"] == 0.24  # the configured lr, as the trainer reports it


def test_muon_step_is_torch_muons_update_on_the_flattened_filter():
    net = muon_net()
    optimizer = build_optimizer("muon", parameter_groups(net), lr=0.1, momentum=0.6,
                                ns_steps=3, sgd_lr=0.5, sgd_momentum=0.85)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    reference = torch.nn.Parameter(net.conv.weight.detach().reshape(4, -1).clone())
    muon = torch.optim.Muon([reference], lr=0.1, momentum=0.6, ns_steps=3, weight_decay=0.0)
    head = torch.nn.Parameter(net.head.weight.detach().clone())
    sgd = torch.optim.SGD([head], lr=0.5, momentum=0.85, nesterov=True)
    for seed in range(2):
        set_gradients(net, seed)
        reference.grad = net.conv.weight.grad.reshape(4, -1).clone()
        head.grad = net.head.weight.grad.clone()
        optimizer.step()
        muon.step()
        sgd.step()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), name  # every trained weight moved
    assert torch.equal(net.conv.weight.reshape(4, -1), reference)
    assert torch.equal(net.head.weight, head)


def test_muon_normalizes_filters_and_skips_those_without_gradient():
    net = muon_net()
    optimizer = build_optimizer("muon", parameter_groups(net), lr=1e-9,
                                normalize_filters=True)
    set_gradients(net, 0)
    optimizer.step()
    # airbench94_muon's projection: norm sqrt(out channels) (the update is 1e-9 x O(1)).
    assert net.conv.weight.norm().item() == pytest.approx(2.0, rel=1e-6)
    frozen = net.conv.weight.detach().clone()
    optimizer.zero_grad()
    set_gradients(net, 1)
    net.conv.weight.grad = None  # as the trainer drops a frozen parameter's gradient
    optimizer.step()
    assert torch.equal(net.conv.weight, frozen)


@pytest.mark.parametrize("fused", [False, True])
def test_muon_state_dict_round_trip_resumes_bit_identically(fused):
    def build(net):
        optimizer = build_optimizer("muon", parameter_groups(net), lr=0.1, sgd_lr=0.5,
                                    sgd_weight_decay=0.01, sgd_decoupled_weight_decay=True,
                                    fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)
        return optimizer, schedule

    def steps(net, optimizer, schedule, seeds):
        for seed in seeds:
            optimizer.zero_grad(set_to_none=True)
            set_gradients(net, seed)
            optimizer.step()
            schedule.step()

    whole = muon_net()
    optimizer, schedule = build(whole)
    steps(whole, optimizer, schedule, range(3))
    saved = io.BytesIO()  # as a checkpoint is written and read: tensors and plain values
    torch.save({"model": whole.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": schedule.state_dict()}, saved)
    steps(whole, optimizer, schedule, range(3, 6))

    resumed = muon_net()
    resumed_optimizer, resumed_schedule = build(resumed)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed.load_state_dict(state["model"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed_schedule.load_state_dict(state["scheduler"])
    assert [g["lr"] for g in resumed_optimizer.param_groups] == pytest.approx(
        [0.1 * 0.7, 0.5 * 0.7, 0.5 * 0.7])  # the schedule's next lrs, not the last used
    steps(resumed, resumed_optimizer, resumed_schedule, range(3, 6))
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name
    assert resumed_optimizer.sgd.param_groups is not optimizer.sgd.param_groups
    assert resumed_optimizer.param_groups[1:] == resumed_optimizer.sgd.param_groups


@pytest.mark.parametrize("options,message", [
    ({"fused": True, "foreach": True}, "optimizer.fused=true and optimizer.foreach=true"),
    ({"ns_steps": 0}, r"optimizer.ns_steps=0 must lie in \[1, 99\]"),
    ({"ns_coefficients": [1.0, 2.0]}, "must be three numbers"),
    ({"sgd_bias_lr": 0.0}, "must be positive"),
    ({"adjust_lr_fn": "bad"}, "optimizer 'muon' refused its options"),
])
def test_muon_refuses_bad_options_in_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as refused:
        build_optimizer("muon", parameter_groups(muon_net()), **options)
    assert "\n" not in str(refused.value)


def test_muon_needs_convolution_filters():
    with pytest.raises(ConfigError, match="found no convolution filters"):
        build_optimizer("muon", parameter_groups(torch.nn.Linear(3, 2)))


class FilterNet(torch.nn.Module):
    """Filters of both orientations as matrices: wide (4 x 27) and tall (16 x 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.tall = torch.nn.Conv2d(1, 16, 2, bias=False)


@pytest.mark.parametrize("options", [
    {},
    {"nesterov": False, "weight_decay": 0.05},
    {"ns_steps": 3, "momentum": 0.6, "eps": 1e-3, "ns_coefficients": (3.0, -3.2, 1.2)},
    {"adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.1},
    {"adjust_lr_fn": "spectral_unclamped"},
])
@pytest.mark.parametrize("device_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_muon_update_is_torch_muons_over_several_steps(options, device_lr):
    """Our step against torch.optim.Muon's on the same matrices and gradients, fp32 on the
    CPU, the lr changing each step; `tensor_lr`: the lr in a tensor, as under a CUDA graph."""
    torch.manual_seed(0)
    net = FilterNet().to(memory_format=torch.channels_last)
    settings = {"lr": 0.05, "momentum": 0.95, "nesterov": True, "weight_decay": 0.0, **options}
    optimizer = build_optimizer("muon", list(net.parameters()), **settings)
    references = [torch.nn.Parameter(p.detach().reshape(p.shape[0], -1).clone())
                  for p in net.parameters()]
    muon = torch.optim.Muon(references, **settings)
    for step in range(5):
        lr = 0.05 * (1 - step / 5)
        optimizer.param_groups[0]["lr"] = torch.tensor(lr) if device_lr else lr
        muon.param_groups[0]["lr"] = lr
        set_gradients(net, step)
        for p, reference in zip(net.parameters(), references, strict=True):
            reference.grad = p.grad.reshape(reference.shape).clone()
        optimizer.step()
        muon.step()
        for p, reference in zip(net.parameters(), references, strict=True):
            torch.testing.assert_close(p.reshape(reference.shape), reference, rtol=1e-6,
                                       atol=1e-7)
    state = optimizer.muon.state
    for matrix, reference in zip(optimizer.muon.param_groups[0]["params"], references,
                                 strict=True):
        torch.testing.assert_close(state[matrix]["momentum_buffer"],
                                   muon.state[reference]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_muon_step_reads_nothing_back_to_the_host():
    """On meta tensors (shapes, no values) any read of a value (.item(), bool, a tensor as a
    Python number) fails: the Muon step, lr in a tensor, is tensor work only, as a CUDA
    graph needs."""
    net = FilterNet().to("meta")
    optimizer = build_optimizer("muon", list(net.parameters()), lr=0.1, weight_decay=0.1,
                                normalize_filters=True, adjust_lr_fn="match_rms_adamw",
                                fused=True)
    for p in net.parameters():
        p.grad = torch.empty_like(p)
    optimizer.param_groups[0]["lr"] = torch.tensor(0.1, device="meta")
    for _ in range(2):  # the first makes the momentum buffers, the second uses them
        optimizer.step()
    assert all(p.device.type == "meta" for p in net.parameters())


def test_muon_fused_option_makes_sgd_fused_and_a_checkpoint_keeps_this_runs_kernels():
    net = muon_net()
    eager = build_optimizer("muon", parameter_groups(net), foreach=True)
    fused = build_optimizer("muon", parameter_groups(net), fused=True)
    assert all(g["fused"] and not g["foreach"] for g in fused.sgd.param_groups)
    set_gradients(net, 0)
    eager.step()  # SGD state to carry over
    fused.load_state_dict(eager.state_dict())  # as a checkpoint from before fused=true
    assert all(g["fused"] and not g["foreach"] for g in fused.sgd.param_groups)
    assert fused.param_groups[1:] == fused.sgd.param_groups
