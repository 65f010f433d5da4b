"""Data-parallel training on several processes started by torchrun (or as the tasks of a
submitit job).

Every rank draws the whole global batch (indices and augmentation) with the same seeded
generator a single process would use, and keeps its own slice of it; gradients are
averaged by DistributedDataParallel. The sample order and augmentation randomness thus do
not depend on the world size, and the loop's state (generator, sampler) is the same on
every rank. Rank 0 alone writes the Hydra output folder, the checkpoints and the MLflow
run; the other ranks log nowhere. Evaluation is sharded: each rank scores its part of the
test set and the sums are added over the ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cifar_exp.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes training one job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank among the processes on this machine: its GPU

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, data: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of `data`: of a global batch (its size divides by
        `size`, so the parts are equal) or of the test set (the parts differ by at most
        one row); together the parts cover every row once."""
        return torch.tensor_split(data, self.size)[self.rank]


SINGLE = World()


def current_world() -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK);
    a single process elsewhere."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def adopt_launcher_tasks() -> None:
    """Under Hydra's submitit launcher with several tasks per job (SLURM's
    `--ntasks-per-node`), make the tasks one data-parallel job: export the variables
    torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from
    submitit's job environment. Elsewhere, and for a single task, nothing changes."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "WORLD_SIZE" in os.environ:
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        # Each rank picks its GPU by LOCAL_RANK (device_for), so all stay visible.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if int(os.environ["RANK"]):  # one log of the job, rank 0's, in its output folder
            logging.getLogger("cifar_exp").setLevel(logging.WARNING)


def hydra_overrides(world: World) -> list[str]:
    """Overrides for a rank other than 0, so that Hydra creates no folder and no log file
    for it: rank 0's output folder is the job's only one."""
    if world.is_main:
        return []
    return ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none",
            "hydra/hydra_logging=none"]


def device_for(name: str, world: World) -> str:
    """`device` for a rank: under torchrun, cuda means this rank's own GPU."""
    if world.distributed and name in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return name


def check_batch_size(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise ConfigError(f"batch_size={batch_size} does not divide into {world.size} "
                          f"equal slices, one per process")


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The process group of a distributed run (gloo on the CPU, nccl on GPUs) for the
    duration of the block; nothing for a single process."""
    if not world.distributed:
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            rank=world.rank, world_size=world.size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def from_main(value: T) -> T:
    """Rank 0's `value` on every rank (e.g. its output folder)."""
    holder: list[Any] = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` added element-wise over all ranks (e.g. correct predictions and count)."""
    total = values.detach().clone()
    dist.all_reduce(total)
    return total


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks (the global batch's loss from the slices')."""
    return sum_over_ranks(value) / dist.get_world_size()


def share_buffers_of_main(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank. Each rank updates
    them from its own slice of the batch; a sharded evaluation must use one set, rank 0's,
    the one its checkpoint saves. DDP broadcasts them before each forward anyway."""
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def agree_on_stop(signum: int | None, device: torch.device) -> int | None:
    """A stop signal seen by any rank stops every rank at the same step."""
    flag = torch.tensor(signum or 0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` wrapped so that backward averages gradients over the ranks."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
