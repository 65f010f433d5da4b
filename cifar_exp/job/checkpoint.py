"""Checkpoints: the whole state of a run at a step boundary, written atomically and read
back without running any code from the file.

A checkpoint holds the state of each named part it is given (`states`: the model,
optimizer and scheduler, and EMA and lookahead where a run has them), the loop's state
(step, training generator, batch sampler, log window, training time, loss scaler, the last
evaluation's scores), the global torch RNG states (CPU, and CUDA when it was used), the
flattened config it was trained with, and whatever the tracker needs to continue its run
(`tracking`: run id, points the store did not take yet). It knows nothing of MLflow or
Hydra: the caller supplies both."""

from __future__ import annotations

import io
import logging
import pickle
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from cifar_exp.config import FREE_KEYS, RESUME_AUTO
from cifar_exp.errors import CheckpointError, ConfigError, one_line
from cifar_exp.job.locks import write_atomically
from cifar_exp.training.loop import LoopState
from cifar_exp.training.parts import OPTIONAL_PARTS, Stateful

log = logging.getLogger(__name__)

# Bumped when the layout of the saved dict changes; older formats are read and upgraded.
# 3: the loop's last scores by name (`loop.scores`), where 2 had `precision` and `test_loss`
# fields. 2: the parts' states by name under `states`, where 1 kept them as top-level keys
# (None for an absent part).
FORMAT = 3
FORMAT_1_PARTS = ("model", "optimizer", "scheduler", "ema", "lookahead")


def atomic_save(content: object, path: Path) -> None:
    """torch.save `content` to `path` so that `path` always holds a whole file, the old one
    or the new one, and never writes through a link at `path` (locks.write_atomically)."""
    # Serialized in memory first: torch's own file writer turns a full disk into an
    # "unexpected pos" RuntimeError, while a plain write says ENOSPC (or EFBIG).
    serialized = io.BytesIO()
    torch.save(content, serialized)
    write_atomically(path, serialized.getbuffer())


def read_tensors(path: Path, instead: str = "resume from another file") -> Any:
    """What torch saved at `path`, read with torch.load(weights_only=True): tensors and
    plain values only, so a file that would build other objects (and run their code) is
    refused unread, in one line (CheckpointError) ending with what to do `instead`."""
    try:
        with warnings.catch_warnings():
            # torch warns about a bare pickle's protocol ahead of refusing it: our one-line
            # refusal below says all that matters.
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(error)
        if "code to call" in reason:
            raise CheckpointError(f"{path}: refused to load ({reason}); a cifar_exp checkpoint "
                                  f"holds only tensors and plain values, so this file is not "
                                  f"one: do not trust it") from error
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason}); {instead}"
                              ) from error
    except Exception as error:  # truncated, not a torch file, unreadable: all the same here
        raise CheckpointError(f"{path}: not a readable checkpoint "
                              f"({one_line(error)}); {instead}") from error
    return state


def load_checkpoint(path: Path, instead: str = "resume from another file") -> dict[str, Any]:
    """Read a checkpoint with torch.load(weights_only=True): tensors and plain values only,
    so a file that would build other objects (and run their code) is refused unread. A
    refusal ends with what to do `instead`."""
    state = read_tensors(path, instead)
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if found == 1:
        state, found = _upgraded_from_format_1(state), 2
    if found == 2:
        state = _upgraded_from_format_2(state)
    elif found != FORMAT:
        raise CheckpointError(f"{path}: not a cifar_exp checkpoint of format {FORMAT} "
                              f"(found {found!r}); {instead}")
    _check_whole(state, path, instead)
    return state


def _check_whole(state: dict[str, Any], path: Path, instead: str) -> None:
    """Refuse a checkpoint that lacks what resuming reads (a file cut down or made by hand)."""
    expected = {"step": int, "config": dict, "states": dict, "rng": dict, "loop": dict,
                "tracking": dict}
    wrong = [key for key, kind in expected.items() if not isinstance(state.get(key), kind)]
    if not wrong:
        loop_fields = {field.name for field in fields(LoopState)}
        wrong = [f"loop.{name}" for name in sorted(loop_fields ^ set(state["loop"]))]
        wrong += [f"tracking.{name}" for name in ("run_id", "pending")
                  if name not in state["tracking"]]
        wrong += [f"rng.{name}" for name in ("torch", "cuda") if name not in state["rng"]]
    if wrong:
        raise CheckpointError(f"{path}: not a whole cifar_exp checkpoint (missing or wrong: "
                              f"{', '.join(wrong[:5])}); {instead}")


def _upgraded_from_format_1(state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 checkpoint in the layout of format 2: its top-level parts, absent ones
    (None, or no key in files written before lookahead existed) left out, under `states`;
    its log window, which kept every loss of the window in one buffer, with no partial
    sums."""
    parts = {name: state.pop(name, None) for name in FORMAT_1_PARTS}
    window = state.get("loop", {}).get("window")
    if isinstance(window, dict):
        window.update(sums=[], summed=0)
    return {**state, "format": 2,
            "states": {name: part for name, part in parts.items() if part is not None}}


def _upgraded_from_format_2(state: dict[str, Any]) -> dict[str, Any]:
    """A format-2 checkpoint in the current layout: its loop's `precision` and `test_loss`
    become its `scores` (a loop without both is left for _check_whole to refuse)."""
    loop = state.get("loop")
    if isinstance(loop, dict) and {"precision", "test_loss"} <= loop.keys():
        loop["scores"] = {name: loop.pop(name) for name in ("precision", "test_loss")}
    return {**state, "format": FORMAT}


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
    try:
        if path.is_file():
            return path
    except OSError as error:  # e.g. a name longer than the file system takes
        raise CheckpointError(f"resume={resume}: cannot be read ({error.strerror})") from error
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
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path} does not fit the model built from this config "
                          f"({one_line(error)})") from error
    try:
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    except (RuntimeError, TypeError) as error:
        raise CheckpointError(f"{path}: its RNG state is damaged ({one_line(error)}); resume "
                              f"from another file") from error
    return LoopState.from_dict(dict(state["loop"]))


def check_loop(loop: LoopState, path: Path, num_items: int) -> None:
    """Refuse a loop state that cannot go on over `num_items` training images (a file
    edited by hand, or damaged), before any run is reopened."""
    sampler, window = loop.sampler, loop.window
    order = sampler.get("order")
    checks = {
        "generator": isinstance(loop.generator, torch.Tensor)
        and loop.generator.dtype == torch.uint8,
        "sampler.order": isinstance(order, torch.Tensor) and order.shape == (num_items,)
        and not order.is_floating_point()
        and torch.equal(order.sort().values, torch.arange(num_items)),
        "sampler.position": isinstance(sampler.get("position"), int)
        and 0 <= sampler["position"] <= num_items,
        "sampler.epoch": isinstance(sampler.get("epoch"), int) and sampler["epoch"] >= 0,
        "window": isinstance(window.get("losses"), torch.Tensor)
        and isinstance(window.get("lrs"), list)
        and window["losses"].shape == (len(window["lrs"]),)
        and isinstance(window.get("sums"), list) and isinstance(window.get("summed"), int),
        "scores": isinstance(loop.scores, dict)
        and all(isinstance(name, str) and isinstance(value, float)
                for name, value in loop.scores.items()),
    }
    wrong = [name for name, fine in checks.items() if not fine]
    if wrong:
        raise CheckpointError(f"{path}: its loop state is damaged ({', '.join(wrong)}); resume "
                              f"from another file")


class Checkpointer:
    """Writes a run's checkpoint file every `every` steps (0: only at the end and when
    stopped), on the training loop's call. `tracking_state` is called just before each
    write: it makes the tracker write its buffered points and returns what the tracker
    needs to continue the run, so the file never runs ahead of the store.

    A write that fails (a full disk, a folder gone) leaves the previous file whole and
    training going on; `failures` and `saved_step` tell the caller what the file holds."""

    def __init__(self, path: Path, every: int, states: Mapping[str, Stateful],
                 config: Mapping[str, Any],
                 tracking_state: Callable[[], dict[str, Any]] = lambda: {"run_id": "",
                                                                          "pending": []},
                 saved_step: int | None = None) -> None:
        self.path, self.every = path, every
        self.states = dict(states)
        self.config = dict(config)
        self.tracking_state = tracking_state
        self.seconds = 0.0  # spent writing checkpoints, for the log and the cost figures
        self.saved_step = saved_step  # the step the file holds (a resumed run's at first)
        self.failures: list[tuple[int, str]] = []  # (step, why) of each write that failed

    def save(self, loop: LoopState) -> None:
        start = time.perf_counter()  # the whole cost: checks, store flush and file write
        states = {name: part.state_dict() for name, part in self.states.items()}
        if not _all_finite(states):
            log.warning("step %d, weights are not finite: checkpoint not written, %s keeps "
                        "the last good one", loop.step, self.path)
            return
        tracking = self.tracking_state()  # first: the store gets every point up to this step
        try:
            self._write(loop, states, tracking)
        except OSError as error:
            self.failures.append((loop.step, error.strerror or one_line(error)))
            log.warning("step %d, checkpoint not written to %s (%s): %s; training goes on",
                        loop.step, self.path, error.strerror or one_line(error),
                        f"it still holds step {self.saved_step}" if self.saved_step
                        else "no checkpoint written yet")
            return
        self.saved_step = loop.step
        seconds = time.perf_counter() - start
        self.seconds += seconds
        log.info("step %d, checkpoint saved to %s (%.3f s)", loop.step, self.path, seconds)

    def _write(self, loop: LoopState, states: dict[str, Any],
               tracking: dict[str, Any]) -> None:
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
    """What torch's weights-only unpickler refused, without its advice on how to load the
    file anyway (weights_only=False, allow-listing): that advice is for trusted files."""
    named = re.search(r"GLOBAL ([\w.]+)", str(error))
    if named:
        return f"it names {named[1]}, code to call, which a checkpoint never holds"
    advice = ("weights_only", "Weights only", "file an issue", "Check the documentation",
              "allowlist", "safe_globals", "trusted source", "WeightsUnpickler error:")
    lines = [line.strip() for line in str(error).splitlines()]
    specific = [line for line in lines if line and not any(a in line for a in advice)]
    return " ".join(specific) if specific else "its contents are not plain tensors and values"

