"""This process's place among the processes that train one job (torchrun's ranks, or a
submitit job's tasks), read from the environment, and its age. Nothing here imports torch:
the command line reads it before anything heavy is loaded."""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from cifar_exp.errors import ConfigError


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


# Read at this module's import, which comes before the command line runs any program:
# whether the process ran programs before it became this interpreter, and how much CPU time
# the interpreter had used by then.
_IMPORTED_AT = time.perf_counter()
_CPU_AT_IMPORT = _cpu_seconds(resource.RUSAGE_SELF)
_RAN_PROGRAMS_FIRST = _cpu_seconds(resource.RUSAGE_CHILDREN) > 0


def interpreter_seconds() -> float:
    """Seconds since this Python interpreter started: the process's age, unless the process
    ran other programs before it became the interpreter. A shell runs the last command of
    `bash -c 'a && b && python ...'` in its own process, which is then as old as the whole
    line (the set-up of a first run, say). Then: the time since this module's import plus
    the CPU time used until then (the interpreter's start and first imports, which keep a
    core busy)."""
    if _RAN_PROGRAMS_FIRST:
        return time.perf_counter() - _IMPORTED_AT + _CPU_AT_IMPORT
    return process_seconds()


def process_seconds() -> float:
    """Seconds since this process was created. On Linux by one clock, the kernel's boot
    clock: /proc/self/stat gives the creation in ticks since boot (10 ms). psutil's
    create_time() adds /proc/stat's boot time instead, whole seconds by the wall clock, so
    its age reads up to 1 s high; it serves where there is no /proc."""
    try:
        stat = Path("/proc/self/stat").read_text()
    except OSError:
        import psutil  # imported here: --help and tab completion never need it

        return time.time() - psutil.Process().create_time()
    created_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the name
    return time.clock_gettime(time.CLOCK_BOOTTIME) - created_ticks / os.sysconf("SC_CLK_TCK")


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
