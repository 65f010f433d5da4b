"""This process's place among the processes that train one job (torchrun's ranks, or a
submitit job's tasks), read from the environment. Nothing here imports torch: the command
line reads it before anything heavy is loaded."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from cifar_exp.errors import ConfigError


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


def check_batch_size(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise ConfigError(f"batch_size={batch_size} does not divide into {world.size} "
                          f"equal slices, one per process")
