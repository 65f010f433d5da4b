"""What runs are called and tagged with, without MLflow or torch (the command line's
--help and tab completion import this): run and model names, the command that started a
run, the code's git commit, and the environment a sweep passes to its jobs."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# The project's source tree: its git commit goes on every run.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# A sweep's parent run id, set by the sweep callback for the jobs it launches.
PARENT_RUN_ENV = "CIFAR_EXP_PARENT_RUN_ID"
# The keys a sweep varies (comma-separated), set by the sweep callback: its jobs are named
# after their values of them.
SWEPT_KEYS_ENV = "CIFAR_EXP_SWEPT_KEYS"


def command_line(module: str = "cifar_exp.run") -> str:
    """The command as the user typed it, for the runs' `command` tag: `cifar-exp ARGS` or
    `python -m MODULE ARGS`, or under torchrun the torchrun command that started this
    rank."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun for the processes it starts
        launcher = torchrun_arguments(os.getppid())
        if launcher is None:  # its process unreadable: the part torchrun must have had
            launcher = [f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}", "-m",
                        module, *sys.argv[1:]]
        return " ".join(["torchrun", *launcher])
    started = Path(sys.argv[0]).name
    command = started if started.startswith("cifar-exp") else f"python -m {module}"
    return " ".join([command, *sys.argv[1:]])


def torchrun_arguments(pid: int) -> list[str] | None:
    """The arguments of the torchrun (or `python -m torch.distributed.run`) process `pid`,
    read from /proc; None where that cannot be read or `pid` is not torchrun."""
    try:
        argv = [arg.decode() for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return None
    for index, arg in enumerate(argv):
        if Path(arg).name == "torchrun" or (arg == "torch.distributed.run"
                                            and argv[index - 1] == "-m"):
            return [arg for arg in argv[index + 1:] if arg]
    return None


def short_keys(keys: Sequence[str]) -> list[str]:
    """Config keys as run names and plot labels show them: by their last part
    (`optimizer.lr` as `lr`), unless two of them end alike."""
    lasts = [key.rsplit(".", 1)[-1] for key in keys]
    return [last if lasts.count(last) == 1 else key for key, last in zip(keys, lasts,
                                                                         strict=True)]


def short_number(value: str) -> str:
    """A real number to 4 significant digits (an Optuna trial's 0.00013869861245357332 as
    0.0001387); an integer, or anything that is no number, as it is."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "e" not in value.lower() else f"{number:.4g}"


def logged_model_name(run_name: str) -> str:
    """A run's name as the name of its logged model (MLflow refuses / : . % and quotes)."""
    return re.sub(r"[/:.%\"']", "_", run_name)


def _git(folder: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True,
                                timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


@functools.cache
def git_tags(folder: Path = PROJECT_ROOT) -> dict[str, str]:
    """The commit checked out in `folder` and whether tracked files differ from it; empty
    outside a git work tree. Cached: every job of a multirun runs the code imported at
    start, so all its runs carry the commit read then."""
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return {}
    changes = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(changes)).lower()}
