"""The speed options as policy: allowed values, checks, and what `auto` becomes."""

from __future__ import annotations

import pytest
import torch

from cifar_exp.errors import ConfigError
from cifar_exp.speed import (
    AMP_FORMATS,
    check_tta,
    resolve_amp,
    resolve_compile,
    resolve_cuda_graph,
    resolve_progress,
)
from cifar_exp.training.step import AMP_DTYPES

CPU = torch.device("cpu")


def test_auto_amp_and_compile_resolve_per_device():
    assert resolve_amp("auto", CPU) == "fp32"
    assert resolve_amp("fp16", CPU) == "fp16"
    assert resolve_compile("auto", CPU) == "none"
    with pytest.raises(ConfigError, match="amp=fp8 is unknown"):
        resolve_amp("fp8", CPU)
    with pytest.raises(ConfigError, match="compile=fastest is unknown"):
        resolve_compile("fastest", CPU)


def test_cuda_graph_auto_is_on_only_where_the_step_can_be_captured():
    cuda = torch.device("cuda")  # a device name only: nothing runs on it
    capturable = {"amp": "bf16", "compile_mode": "none", "fused_optimizer": True,
                  "data_parallel": False}
    assert resolve_cuda_graph("auto", cuda, **capturable)
    assert not resolve_cuda_graph(False, cuda, **capturable)
    assert not resolve_cuda_graph("auto", CPU, **capturable)
    for obstacle in ({"amp": "fp16"}, {"compile_mode": "reduce-overhead"},
                     {"compile_mode": "max-autotune"}, {"fused_optimizer": False},
                     {"data_parallel": True}):
        assert not resolve_cuda_graph("auto", cuda, **{**capturable, **obstacle}), obstacle
    for compiled in ("default", "max-autotune-no-cudagraphs"):
        assert not resolve_cuda_graph("auto", cuda, **{**capturable, "compile_mode": compiled})
        assert resolve_cuda_graph(True, cuda, **{**capturable, "compile_mode": compiled})


@pytest.mark.parametrize("device,obstacle,message", [
    ("cpu", {}, "it needs a CUDA GPU"),
    ("cuda", {"amp": "fp16"}, "fp16's loss scaling reads the GPU each step"),
    ("cuda", {"fused_optimizer": False}, r"it needs a fused optimizer \(optimizer.fused=true\)"),
    ("cuda", {"compile_mode": "reduce-overhead"}, "compile=reduce-overhead makes its own"),
    ("cuda", {"data_parallel": True}, "data-parallel steps are not captured"),
])
def test_cuda_graph_true_where_it_cannot_work_says_why(device, obstacle, message):
    settings = {"amp": "bf16", "compile_mode": "none", "fused_optimizer": True,
                "data_parallel": False, **obstacle}
    with pytest.raises(ConfigError, match=f"cuda_graph=true cannot work here: {message}"):
        resolve_cuda_graph(True, torch.device(device), **settings)


def test_unknown_cuda_graph_setting_is_refused():
    with pytest.raises(ConfigError, match="cuda_graph=always is unknown; use auto, true or false"):
        resolve_cuda_graph("always", CPU, "fp32", "none", fused_optimizer=True,
                           data_parallel=False)


def test_every_amp_format_has_an_autocast_dtype():
    assert set(AMP_DTYPES) == set(AMP_FORMATS)


def test_unknown_tta_is_refused():
    check_tta("flip_translate")
    with pytest.raises(ConfigError, match="tta=mirror is unknown; use one of none, flip, "
                                          "flip_translate"):
        check_tta("mirror")


def test_a_launchers_step_gets_neither_compile_nor_graphs_whatever_was_asked():
    cuda = torch.device("cuda")  # a device name only: nothing runs on it
    capturable = {"amp": "bf16", "compile_mode": "none", "fused_optimizer": True,
                  "data_parallel": False}
    assert resolve_compile("default", cuda, own_step=False) == "none"
    assert resolve_compile("default", cuda) == "default"
    for asked in ("auto", True):
        assert not resolve_cuda_graph(asked, cuda, **capturable, own_step=False)
        assert resolve_cuda_graph(asked, cuda, **capturable)
    # What could not work is refused whoever takes the steps.
    with pytest.raises(ConfigError, match="cuda_graph=true cannot work here: it needs a CUDA"):
        resolve_cuda_graph(True, CPU, **capturable, own_step=False)


def test_only_a_main_process_that_owns_its_console_shows_a_progress_bar():
    assert resolve_progress(main_process=True, shares_console=False)
    assert not resolve_progress(main_process=True, shares_console=True)
    assert not resolve_progress(main_process=False, shares_console=False)
