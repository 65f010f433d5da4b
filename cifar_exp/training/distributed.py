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
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cifar_exp.world import World

T = TypeVar("T")


def shard(world: World, data: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of `data`: of a global batch (its size divides by the
    world's size, so the parts are equal) or of the test set (the parts differ by at most
    one row); together the parts cover every row once."""
    return torch.tensor_split(data, world.size)[world.rank]


def device_for(name: str, world: World) -> str:
    """`device` for a rank: under torchrun, cuda means this rank's own GPU."""
    if world.distributed and name in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return name


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
