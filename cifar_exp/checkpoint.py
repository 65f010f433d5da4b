"""Checkpoints: the whole state of a run at a step boundary, written atomically and read
back without running any code from the file.

A checkpoint holds the state of each named part it is given (`states`: the model,
optimizer and scheduler, and EMA and lookahead where a run has them), the loop's state
(step, training generator, batch sampler, log window, training time, loss scaler), the
global torch RNG states (CPU, and CUDA when it was used), the flattened config it was
trained with, and whatever the tracker needs to continue its run (`tracking`: run id,
points the store did not take yet). It knows nothing of MLflow or Hydra: the caller
supplies both."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from cifar_exp.errors import CheckpointError, ConfigError
from cifar_exp.train import OPTIONAL_PARTS, LoopState, Stateful

log = logging.getLogger(__name__)

RESUME_AUTO = "auto"  # resume=auto: continue if this job has a checkpoint, else start
# Bumped when the layout of the saved dict changes. 2: the parts' states by name under
# `states`; 1 (read and upgraded) kept them as top-level keys, None for an absent part.
FORMAT = 2
FORMAT_1_PARTS = ("model", "optimizer", "scheduler", "ema", "lookahead")
FILENAME = "checkpoint.pt"
# Config keys that say where things live, not what is trained: they may differ between a
# run and its resumption. Every other key must match, or the result would not be the run's.
FREE_KEYS = ("resume", "checkpoint.", "tracking.", "data.root", "data.download",
             "data.verify", "data.manifest")


def atomic_save(content: object, path: Path) -> None:
    """torch.save `content` to `path` so that `path` always holds a whole file, the old one
    or the new one: write a temporary file in the same folder, flush it to the disk, rename
    it over `path`, then flush the folder so the rename survives a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                             dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(content, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with torch.load(weights_only=True): tensors and plain values only,
    so a file that would build other objects (and run their code) is refused unread."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(error)
        if "GLOBAL" in reason:  # the file names a function or class to call: code
            raise CheckpointError(f"{path}: refused to load ({reason}); a cifar_exp checkpoint "
                                  f"holds only tensors and plain values, so this file is not "
                                  f"one: do not trust it") from error
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason}); resume from "
                              f"another file") from error
    except Exception as error:  # truncated, not a torch file, unreadable: all the same here
        raise CheckpointError(f"{path}: not a readable checkpoint "
                              f"({_one_line(error)}); resume from another file") from error
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if found == 1:
        return _upgraded_from_format_1(state)
    if found != FORMAT:
        raise CheckpointError(f"{path}: not a cifar_exp checkpoint of format {FORMAT} "
                              f"(found {found!r})")
    return state


def _upgraded_from_format_1(state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 checkpoint in the current layout: its top-level parts, absent ones (None,
    or no key in files written before lookahead existed) left out, under `states`."""
    parts = {name: state.pop(name, None) for name in FORMAT_1_PARTS}
    return {**state, "format": FORMAT,
            "states": {name: part for name, part in parts.items() if part is not None}}


def find_checkpoint(resume: bool | str, default: Path) -> Path | None:
    """The checkpoint file `resume` names: None for false, `default` for true, else the
    path given. A file that is not there is an error that says where to look. `auto`:
    `default` if it is there, else None (a job resubmitted by a cluster after a time-out
    or preemption goes on where it stopped, a first submission starts)."""
    if resume is False or resume is None:
        return None
    if resume == RESUME_AUTO:
        return default if default.is_file() else None
    path = default if resume is True else Path(str(resume)).expanduser()
    if path.is_file():
        return path
    if resume is True:
        raise CheckpointError(
            f"resume=true: no checkpoint at {path}; pass the interrupted run's folder "
            f"(hydra.run.dir=<folder>, named in its log) or the file itself (resume=<file>)")
    raise CheckpointError(f"resume={resume}: no such checkpoint file")


def check_config(state: Mapping[str, Any], config: Mapping[str, Any], path: Path) -> None:
    """Refuse to resume under a config that trains something else than the checkpoint's."""
    saved = state["config"]
    keys = sorted(k for k in {*saved, *config} if not k.startswith(FREE_KEYS))
    differ = [k for k in keys if saved.get(k, "<unset>") != config.get(k, "<unset>")]
    if differ:
        shown = ", ".join(f"{k}={saved.get(k, '<unset>')} there, {config.get(k, '<unset>')} "
                          f"here" for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ConfigError(f"{path} was written with another config ({shown}{more}); resume "
                          f"with the run's own overrides (its .hydra/overrides.yaml)")


def restore(state: Mapping[str, Any], path: Path, states: Mapping[str, Stateful]) -> LoopState:
    """Load each named part of `states` and the global RNG states from `state`; return the
    loop's state. The checkpoint must hold exactly the parts this config builds."""
    saved = state["states"]
    for name in sorted(saved.keys() ^ states.keys()):
        label, option = OPTIONAL_PARTS.get(name, (name, name))
        raise ConfigError(f"{path}: the checkpoint was trained "
                          f"{'with' if name in saved else 'without'} {label}; resume "
                          f"with the same {option}")
    try:
        for name, part in states.items():
            part.load_state_dict(saved[name])
    except (RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"{path} does not fit the model built from this config "
                          f"({_one_line(error)})") from error
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return LoopState.from_dict(dict(state["loop"]))


class Checkpointer:
    """Writes a run's checkpoint file every `every` steps (0: only at the end and when
    stopped), on the training loop's call. `tracking_state` is called just before each
    write: it makes the tracker write its buffered points and returns what the tracker
    needs to continue the run, so the file never runs ahead of the store."""

    def __init__(self, path: Path, every: int, states: Mapping[str, Stateful],
                 config: Mapping[str, Any],
                 tracking_state: Callable[[], dict[str, Any]] = dict) -> None:
        self.path, self.every = path, every
        self.states = dict(states)
        self.config = dict(config)
        self.tracking_state = tracking_state
        self.seconds = 0.0  # spent writing checkpoints, for the log and the cost figures

    def save(self, loop: LoopState) -> None:
        start = time.perf_counter()  # the whole cost: checks, store flush and file write
        states = {name: part.state_dict() for name, part in self.states.items()}
        if not _all_finite(states):
            log.warning("step %d, weights are not finite: checkpoint not written, %s keeps "
                        "the last good one", loop.step, self.path)
            return
        tracking = self.tracking_state()  # first: the store gets every point up to this step
        atomic_save({
            "format": FORMAT,
            "step": loop.step,
            "config": self.config,
            "states": states,
            "rng": {"torch": torch.get_rng_state(),
                    # Only when CUDA is in use: asking would otherwise start a CUDA context.
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized()
                    else []},
            "loop": loop.to_dict(),
            "tracking": tracking,
        }, self.path)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        log.info("step %d, checkpoint saved to %s (%.3f s)", loop.step, self.path, seconds)



def _all_finite(state: object) -> bool:
    """Whether every floating-point tensor in a nest of dicts and lists is finite."""
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, Mapping):
        return all(_all_finite(value) for value in state.values())
    if isinstance(state, list | tuple):
        return all(_all_finite(value) for value in state)
    return True


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that says what was refused, without the
    paragraphs around it (about torch.load's defaults and where to read more)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines()]
    specific = [line for line in lines if line and not line.startswith(boilerplate)]
    return " ".join(specific) if specific else _one_line(error)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."
