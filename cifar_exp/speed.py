"""The options that trade time for something else, as policy: their allowed values, their
checks, and what `auto` becomes on a device. Mixed precision (`amp`), torch.compile,
whole-step CUDA graphs, and test-time augmentation (`tta`). The step and the evaluation
apply these choices; the config schema checks them with nothing else imported."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cifar_exp.errors import ConfigError

if TYPE_CHECKING:
    import torch

AMP_FORMATS = ("fp32", "bf16", "fp16")  # autocast formats; the weights stay fp32
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")
# These compile modes capture the compiled step in CUDA graphs of their own.
COMPILE_MODES_WITH_GRAPHS = ("reduce-overhead", "max-autotune")
TTA_MODES = ("none", "flip", "flip_translate")


def check_amp(name: str) -> None:
    """Refuse an unknown `amp` format."""
    if name != "auto" and name not in AMP_FORMATS:
        raise ConfigError(f"amp={name} is unknown; use auto or one of {', '.join(AMP_FORMATS)}")


def check_compile(mode: str) -> None:
    """Refuse an unknown `compile` mode."""
    if mode != "auto" and mode not in COMPILE_MODES:
        raise ConfigError(f"compile={mode} is unknown; use auto or one of "
                          f"{', '.join(COMPILE_MODES)}")


def check_cuda_graph(setting: object) -> None:
    """Refuse a `cuda_graph` value other than auto, true or false."""
    if not (setting == "auto" or isinstance(setting, bool)):
        raise ConfigError(f"cuda_graph={setting} is unknown; use auto, true or false")


def check_tta(mode: str) -> None:
    """Refuse an unknown test-time augmentation."""
    if mode not in TTA_MODES:
        raise ConfigError(f"tta={mode} is unknown; use one of {', '.join(TTA_MODES)}")


def resolve_amp(name: str, device: torch.device) -> str:
    """`auto` -> bf16 autocast on a GPU (fp16 where bf16 is missing); fp32 on the CPU, where
    bf16 ran 1.4x faster but the 3,000-step run lost 0.6 points over 3 seeds (see the
    measurement log)."""
    check_amp(name)
    if name != "auto":
        return name
    if device.type == "cuda":
        import torch  # here: validating a config (config.py) must not load torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def resolve_compile(mode: str, device: torch.device, *, own_step: bool = True) -> str:
    """`auto` -> none on every device. On the CPU the compiled step measured slower than
    eager and costs about 30 s to compile; on a GPU the whole-step CUDA graphs of
    `cuda_graph=auto` already remove the launch overhead that compiling would, without its
    ~40 s of compilation per process. Without `own_step` (a launcher's step maker takes
    the steps, e.g. a packed sweep's stacked step) nothing of the job's is compiled."""
    check_compile(mode)
    return "none" if mode == "auto" or not own_step else mode


def resolve_cuda_graph(setting: object, device: torch.device, amp: str, compile_mode: str, *,
                       fused_optimizer: bool, data_parallel: bool, own_step: bool = True) -> bool:
    """Whether to replay the whole step as CUDA graphs. `auto` -> wherever the step can be
    captured and is not compiled; `true` where it cannot be captured is refused with the
    reason (`compile_mode` as asked). Without `own_step` the launcher's step runs as it
    chooses (op by op for a packed sweep's stacked step; the run's tags say what ran), but
    a `true` that could not work is still refused."""
    check_cuda_graph(setting)
    obstacles = [reason for present, reason in (
        (device.type != "cuda", "it needs a CUDA GPU"),
        (not fused_optimizer, "it needs a fused optimizer (optimizer.fused=true), whose lr "
                              "can live on the GPU"),
        (amp == "fp16", "fp16's loss scaling reads the GPU each step; use amp=bf16"),
        (compile_mode in COMPILE_MODES_WITH_GRAPHS, f"compile={compile_mode} makes its own "
                                                    f"CUDA graphs"),
        (data_parallel, "data-parallel steps are not captured")) if present]
    if setting is True and obstacles:
        raise ConfigError(f"cuda_graph=true cannot work here: {obstacles[0]}; use "
                          f"cuda_graph=auto or false")
    if not own_step:
        return False
    if setting == "auto":
        # Graphs around a torch.compile'd step are allowed with `true` but not yet measured
        # on a GPU, so `auto` leaves them out.
        return not obstacles and compile_mode == "none"
    return bool(setting)


def resolve_progress(main_process: bool, shares_console: bool) -> bool:
    """A progress bar for the job's main process, unless other jobs share its console (a
    packed sweep shows one bar for all of its jobs)."""
    return main_process and not shares_console
