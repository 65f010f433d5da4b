"""Config -> the parts of a run as one `Parts`: augmentation, model, optimizer,
schedule, EMA, lookahead, and the trainer's settings."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from cifar_exp.augment import Augmentation, build_augmentation
from cifar_exp.config import split_name
from cifar_exp.data import IMAGE_BYTES, IMAGE_SHAPE, SPECS, CifarData
from cifar_exp.errors import ConfigError
from cifar_exp.models import build_model, initialize_from_data, wants_data
from cifar_exp.optim import build_optimizer
from cifar_exp.optim.groups import parameter_groups
from cifar_exp.schedules import build_schedule
from cifar_exp.speed import resolve_amp, resolve_compile, resolve_cuda_graph, resolve_progress
from cifar_exp.training.ema import WeightAverage
from cifar_exp.training.lookahead import Lookahead
from cifar_exp.training.parts import Parts, TrainSettings
from cifar_exp.world import SINGLE, World

# Models that initialize from data (e.g. a whitening layer) see this many training images,
# as airbench's whitening does: plenty for a 12 x 12 patch covariance.
DATA_INIT_IMAGES = 5000
# check_parts: both CIFAR sets' training images (the schedule's steps per epoch, as the job
# will have them), and how many made-up images stand in for them.
TRAIN_IMAGES, STAND_IN_IMAGES = 50_000, 4


def resolve_device(name: str, job_number: int | None = None) -> torch.device:
    """auto -> cuda when a GPU is visible, else cpu. Jobs of a sweep (numbered 0, 1, ...)
    take the visible GPUs in turn, so parallel jobs each get their own."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and job_number is not None:
        return torch.device("cuda", job_number % torch.cuda.device_count())
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The card's name for a GPU (as runs are tagged and the bench reports), else `cpu`."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def select_gpu(device: torch.device) -> None:
    """Make a sweep job's or a rank's GPU (`cuda:N`) the current one. A plain `cuda` keeps
    the current GPU: set_device refuses a device without an index."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def build_parts(cfg: DictConfig, data: CifarData, world: World = SINGLE, *,
                own_step: bool = True, shares_console: bool = False) -> Parts:
    """Build every part named by `cfg` for `data` (already on the training device), to
    train in `world` (one process, or the ranks of a data-parallel job). `own_step`: the
    trainer makes its own step (not a launcher's step maker); `shares_console`: other jobs
    of this process show their progress with this one's."""
    num_train = data.train_labels.numel()
    if cfg.batch_size > num_train:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {num_train} training images")
    device = data.train_images.device
    augmentation, model = build_network(cfg, data)
    optimizer, scheduler = build_optimization(cfg, model, num_train / cfg.batch_size)
    ema = WeightAverage(model, cfg.ema.decay) if cfg.ema.decay is not None else None
    lookahead = (Lookahead(model, cfg.lookahead.every, cfg.lookahead.decay, cfg.steps,
                           cfg.lookahead.start_epochs, cfg.lookahead.reset_each_epoch)
                 if cfg.lookahead.every is not None else None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark  # shapes are static
    settings = build_settings(cfg, device, world, own_step=own_step,
                              shares_console=shares_console)
    return Parts(augmentation, model, optimizer, scheduler, ema=ema, lookahead=lookahead,
                 settings=settings)


def build_optimization(cfg: DictConfig, model: torch.nn.Module, steps_per_epoch: float
                       ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer `cfg` names over `model`'s parameter groups, and its schedule."""
    name, options = split_name(cfg.optimizer)
    optimizer = build_optimizer(name, parameter_groups(model), **options)
    name, options = split_name(cfg.schedule)
    scheduler = build_schedule(name, optimizer, cfg.steps, steps_per_epoch, **options)
    return optimizer, scheduler


def check_parts(cfg: DictConfig, device: torch.device) -> None:
    """Build the augmentation, model, optimizer and schedule `cfg` names for a few made-up
    images, and the settings for `device`, and drop them: a builder that refuses its
    options raises its ConfigError here, before any data is read (a packed sweep checks
    every job so before any trains). The parts are built on the CPU, leaving the GPU
    alone: no builder's checks depend on where its tensors live. What needs the real
    images, batch_size against their number, is left to build_parts."""
    _, model = build_network(cfg, stand_in_data(cfg.data.name))
    build_optimization(cfg, model, TRAIN_IMAGES / cfg.batch_size)
    build_settings(cfg, device)


def stand_in_data(name: str) -> CifarData:
    """A few varied images of CIFAR's shape, with data set `name`'s classes (10 for a name
    load_cifar refuses): what the builders see of the data, without reading it."""
    num_classes = SPECS[name].num_classes if name in SPECS else 10
    images = (torch.arange(STAND_IN_IMAGES * IMAGE_BYTES) % 251).to(torch.uint8).reshape(
        STAND_IN_IMAGES, *IMAGE_SHAPE)  # not constant: the channels' std > 0
    labels = torch.arange(STAND_IN_IMAGES) % num_classes
    return CifarData(images, labels, images, labels, [str(c) for c in range(num_classes)])


def build_network(cfg: DictConfig, data: CifarData) -> tuple[Augmentation, torch.nn.Module]:
    """The augmentation (its statistics measured on `data`'s training images) and the
    model `cfg` names, on `data`'s device, seeded by `cfg.seed` as training builds them."""
    torch.manual_seed(cfg.seed)
    name, options = split_name(cfg.augmentation)
    augmentation = build_augmentation(name, data.train_images, **options)
    name, options = split_name(cfg.model)
    model = build_model(name, data.num_classes, augmentation.image_size, **options)
    model.to(data.train_images.device)
    if wants_data(model):
        initialize_from_data(model, augmentation.eval(data.train_images[:DATA_INIT_IMAGES]))
    return augmentation, model


def build_settings(cfg: DictConfig, device: torch.device, world: World = SINGLE, *,
                   own_step: bool = True, shares_console: bool = False) -> TrainSettings:
    """The trainer's settings from `cfg`, with the speed options resolved once, by the
    policy in cifar_exp.speed, for `device`, `world` and the launcher's facts (see
    build_parts); they are not changed after."""
    amp = resolve_amp(cfg.amp, device)
    cuda_graph = resolve_cuda_graph(cfg.cuda_graph, device, amp,
                                    resolve_compile(cfg.compile, device),
                                    fused_optimizer=bool(cfg.optimizer.get("fused")),
                                    data_parallel=world.distributed, own_step=own_step)
    compile_mode = resolve_compile(cfg.compile, device, own_step=own_step)
    return TrainSettings(steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed,
                         log_every=cfg.log_every, eval_every=cfg.eval_every,
                         eval_batch_size=cfg.eval_batch_size, channels_last=cfg.channels_last,
                         amp=amp, compile=compile_mode, cuda_graph=cuda_graph,
                         label_smoothing=cfg.label_smoothing, tta=cfg.tta,
                         progress=resolve_progress(world.is_main, shares_console))
