"""Checkpoint files: atomic writes, what they hold, and the refusals on resume."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from typing import Any

import pytest
import torch

from cifar_exp.errors import CheckpointError, ConfigError
from cifar_exp.job.checkpoint import (
    FORMAT,
    Checkpointer,
    atomic_save,
    check_config,
    check_loop,
    find_checkpoint,
    load_checkpoint,
    restore,
)
from cifar_exp.models import build_model
from cifar_exp.optim import build_optimizer
from cifar_exp.schedules import build_schedule
from cifar_exp.training.ema import WeightAverage
from cifar_exp.training.lookahead import Lookahead
from cifar_exp.training.loop import LoopState
from tests.conftest import MkdirPayload
from tests.test_config import options


def make_parts(schedule: str = "constant", ema: bool = True) -> dict:
    """The named states of a tf_cnn run: model, optimizer, scheduler and (with `ema`) EMA."""
    torch.manual_seed(0)
    model = build_model("tf_cnn", 10, 24)
    optimizer = build_optimizer("adam", model.parameters(), lr=1e-3)
    scheduler = build_schedule(schedule, optimizer, 100, 390.625)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    return {**parts, "ema": WeightAverage(model, 0.99)} if ema else parts


def loop_state(step: int = 5) -> LoopState:
    return LoopState(step=step, generator=torch.Generator().manual_seed(1).get_state(),
                     sampler={"order": torch.arange(10), "position": 4, "epoch": 2},
                     window={"losses": torch.tensor([2.5]), "lrs": [1e-3], "first_step": 5,
                             "sums": [], "summed": 0, "seconds": 0.25},
                     train_seconds=1.5, scaler={},
                     scores={"precision": 0.25, "test_loss": 2.0, "precision_top5": 0.75})


def written_as_format(version: int, state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's dict as format `version` (1 or 2) held it: the loop's `precision` and
    `test_loss` as its fields (no other scores); in format 1, the parts at the top level,
    None for an absent EMA."""
    loop = {name: value for name, value in state["loop"].items() if name != "scores"}
    scores = state["loop"]["scores"]
    loop.update(precision=scores.get("precision", math.nan),
                test_loss=scores.get("test_loss", math.nan))
    old = {**state, "format": 2, "loop": loop}
    if version == 1:
        old = {key: value for key, value in old.items() if key != "states"}
        old.update(format=1, **{"ema": None, **state["states"]})
    return old


def take_steps(parts: dict, steps: int = 2) -> None:
    model, optimizer, scheduler = parts["model"], parts["optimizer"], parts["scheduler"]
    ema = parts.get("ema")
    for _ in range(steps):
        loss = model(torch.randn(4, 3, 24, 24)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)


def test_atomic_save_replaces_the_file_whole(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1}, path)
    atomic_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_atomic_save_replaces_a_link_at_the_path_and_leaves_its_target(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"keep me")
    path = tmp_path / "checkpoint.pt"
    path.symlink_to(target)
    atomic_save({"step": 1}, path)
    assert not path.is_symlink() and torch.load(path, weights_only=True) == {"step": 1}
    assert target.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "precious.txt"]


def test_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1}, path)

    def disk_full(content, file):
        file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_disk_that_fills_up_reports_its_own_error_and_keeps_the_old_file(tmp_path):
    # A real write failure: a file size limit, which makes writes past 100 kB fail with
    # EFBIG as a full disk does with ENOSPC (torch's own writer would hide either).
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1}, path)
    code = ("import resource, sys, torch; from pathlib import Path\n"
            "from cifar_exp.job.checkpoint import atomic_save\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
            "try:\n"
            "    atomic_save({'weights': torch.zeros(1_000_000)}, Path(sys.argv[1]))\n"
            "except OSError as error:\n"
            "    print(error.strerror)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "File too large"
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_checkpoint_round_trips_every_state(tmp_path):
    parts = make_parts("onecycle")
    take_steps(parts)
    torch.manual_seed(42)
    rng = torch.get_rng_state()
    path = tmp_path / "sub" / "checkpoint.pt"
    tracking = {"run_id": "abc", "pending": [("loss", 2.0, 1000, 5)]}
    saver = Checkpointer(path, 10, parts, {"steps": 100, "seed": 0}, lambda: tracking)
    saver.save(loop_state())
    state = load_checkpoint(path)
    assert state["format"] == FORMAT and state["step"] == 5
    assert state["config"] == {"steps": 100, "seed": 0} and state["tracking"] == tracking
    assert saver.seconds > 0

    fresh = make_parts("onecycle")
    torch.manual_seed(7)
    loop = restore(state, path, fresh)
    assert torch.equal(torch.get_rng_state(), rng)
    assert loop.step == 5 and loop.window["lrs"] == [1e-3] and loop.sampler["epoch"] == 2
    assert torch.equal(loop.generator, loop_state().generator)
    assert state["states"].keys() == {"model", "optimizer", "scheduler", "ema"}
    for name, tensor in parts["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[name], tensor), name
    for name, tensor in parts["ema"].model.state_dict().items():
        assert torch.equal(fresh["ema"].model.state_dict()[name], tensor), name
    assert fresh["ema"].updates == parts["ema"].updates == 2
    assert fresh["scheduler"].state_dict() == parts["scheduler"].state_dict()
    # The optimizer goes on exactly: one more step from both lands on the same weights.
    torch.manual_seed(3)
    take_steps(parts, steps=1)
    torch.manual_seed(3)
    take_steps(fresh, steps=1)
    for a, b in zip(parts["model"].parameters(), fresh["model"].parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("schedule", options("schedule"))
def test_every_schedule_state_loads_as_plain_data(tmp_path, schedule):
    parts = make_parts(schedule, ema=False)
    take_steps(parts)
    scheduler = parts["scheduler"]
    atomic_save(scheduler.state_dict(), tmp_path / "s.pt")
    fresh = make_parts(schedule, ema=False)["scheduler"]
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert fresh.get_last_lr() == scheduler.get_last_lr()


def test_non_finite_weights_never_replace_the_last_good_checkpoint(tmp_path, caplog):
    parts = make_parts()
    path = tmp_path / "checkpoint.pt"
    saver = Checkpointer(path, 10, parts, {})
    saver.save(loop_state(step=10))
    with torch.no_grad():
        next(parts["model"].parameters())[0] = float("nan")
    saver.save(loop_state(step=20))
    assert load_checkpoint(path)["step"] == 10
    assert any("weights are not finite: checkpoint not written" in m for m in caplog.messages)


@pytest.mark.filterwarnings("error")  # nothing of torch's printed ahead of the refusal
@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2", "pickle protocol 5"])
def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "checkpoint.pt"
    content = {"format": FORMAT, "step": 1, "model": MkdirPayload(marker)}
    if writer == "torch.save":
        torch.save(content, path)
    else:
        path.write_bytes(pickle.dumps(content, protocol=int(writer[-1])))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message
    if writer == "pickle protocol 5":  # opcodes the safe unpickler does not even parse
        assert message.startswith(f"{path}: not a readable checkpoint (Unsupported operand")
    else:
        assert message.startswith(f"{path}: refused to load (it names posix.mkdir, code to "
                                  f"call, which a checkpoint never holds)")
        assert message.endswith("do not trust it")
    # Never the advice on loading it anyway: that is for files one trusts.
    for advice in ("weights_only", "safe_globals", "allowlist", "trusted source"):
        assert advice not in message, advice
    assert not marker.exists()


@pytest.mark.parametrize("builtin", [exec, eval])
def test_an_exec_or_eval_payload_is_refused_without_advice_to_load_it(tmp_path, builtin):
    class CallsBuiltin:
        def __reduce__(self):
            return (builtin, ("open('ran', 'w')",))

    path = tmp_path / "checkpoint.pt"
    torch.save({"format": FORMAT, "step": 1, "states": {"model": CallsBuiltin()}}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value) == (
        f"{path}: refused to load (it names {builtin.__name__}, code to call, which a "
        f"checkpoint never holds); a cifar_exp checkpoint holds only tensors and plain "
        f"values, so this file is not one: do not trust it")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("cut", ["step", "states", "loop", "tracking", "rng"])
def test_a_checkpoint_missing_a_part_is_refused_in_one_line(tmp_path, cut):
    path = tmp_path / "checkpoint.pt"
    Checkpointer(path, 10, make_parts(), {}).save(loop_state())
    state = torch.load(path, weights_only=True)
    del state[cut]
    atomic_save(state, path)
    with pytest.raises(CheckpointError, match=rf"not a whole cifar_exp checkpoint \(missing "
                                              rf"or wrong: {cut}\); resume from another file"):
        load_checkpoint(path)


def test_unreadable_checkpoints_are_one_line(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable checkpoint"):
        load_checkpoint(garbage)
    truncated = tmp_path / "truncated.pt"
    atomic_save({"format": FORMAT, "weights": torch.zeros(10_000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:20_000])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    atomic_save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match=f"not a cifar_exp checkpoint of format {FORMAT}"):
        load_checkpoint(other)


def test_find_checkpoint_says_where_it_looked(tmp_path):
    default = tmp_path / "checkpoint.pt"
    assert find_checkpoint(False, default) is None
    with pytest.raises(CheckpointError, match=f"resume=true: no checkpoint at {default}; "
                                              f"pass the interrupted run's folder"):
        find_checkpoint(True, default)
    with pytest.raises(CheckpointError, match="resume=/nowhere/c.pt: no such checkpoint file"):
        find_checkpoint("/nowhere/c.pt", default)
    default.write_bytes(b"")
    assert find_checkpoint(True, default) == default
    assert find_checkpoint(str(default), tmp_path / "elsewhere.pt") == default


def test_resume_auto_continues_only_where_a_checkpoint_is(tmp_path):
    default = tmp_path / "checkpoint.pt"
    assert find_checkpoint("auto", default) is None  # a first submission starts
    default.write_bytes(b"")
    assert find_checkpoint("auto", default) == default  # a resubmitted one goes on


def test_config_must_match_except_where_things_live(tmp_path):
    saved = {"steps": 60, "optimizer.lr": 0.001, "data.root": "/a", "tracking.uri": "x",
             "checkpoint.every": 20, "resume": False}
    state = {"config": saved}
    moved = {**saved, "data.root": "/b", "tracking.uri": "y", "checkpoint.every": 0,
             "resume": True}
    check_config(state, moved, tmp_path / "c.pt")
    changed = {**saved, "steps": 80, "optimizer.lr": 0.01}
    with pytest.raises(ConfigError, match=r"c.pt was written with another config "
                                          r"\(optimizer.lr=0.001 there, 0.01 here, "
                                          r"steps=60 there, 80 here\)"):
        check_config(state, changed, tmp_path / "c.pt")


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    parts = make_parts()
    path = tmp_path / "checkpoint.pt"
    Checkpointer(path, 10, parts, {}).save(loop_state())
    state = load_checkpoint(path)
    state["states"]["model"]["local4.weight"] = torch.zeros(100, 384)
    with pytest.raises(ConfigError, match=r"checkpoint.pt does not fit the model built from "
                                          r"this config \(.*size mismatch for local4.weight"):
        restore(state, path, make_parts())
    without_ema = make_parts(ema=False)
    with pytest.raises(ConfigError, match="trained with EMA; resume with the same ema.decay"):
        restore(load_checkpoint(path), path, without_ema)
    averaged = {**make_parts(), "lookahead": Lookahead(parts["model"], 5, 0.95, 100)}
    with pytest.raises(ConfigError, match="trained without lookahead; resume with the same "
                                          "lookahead.every"):
        restore(load_checkpoint(path), path, averaged)


@pytest.mark.parametrize("lookahead_key", [True, False])
def test_a_format_1_checkpoint_is_read_in_the_current_layout(tmp_path, lookahead_key):
    # Format 1 kept each part at the top level, None for an absent one; files written
    # before lookahead existed have no lookahead key at all.
    parts = make_parts(ema=False)
    take_steps(parts)
    path = tmp_path / "old.pt"
    Checkpointer(path, 10, parts, {"steps": 100}).save(loop_state())
    old = written_as_format(1, torch.load(path, weights_only=True))
    if lookahead_key:
        old["lookahead"] = None
    atomic_save(old, path)
    upgraded = load_checkpoint(path)
    assert upgraded["format"] == FORMAT
    assert upgraded["states"].keys() == {"model", "optimizer", "scheduler"}
    fresh = make_parts(ema=False)
    assert restore(upgraded, path, fresh).step == 5
    for name, tensor in parts["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[name], tensor), name


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_checkpoint_keeps_its_scores_by_name(tmp_path, version):
    # Formats 1 and 2 kept the last evaluation's precision and test loss as loop fields.
    parts = make_parts(ema=False)
    path = tmp_path / "old.pt"
    Checkpointer(path, 10, parts, {"steps": 100}).save(loop_state())
    atomic_save(written_as_format(version, torch.load(path, weights_only=True)), path)
    upgraded = load_checkpoint(path)
    assert upgraded["format"] == FORMAT
    loop = restore(upgraded, path, make_parts(ema=False))
    assert loop.scores == {"precision": 0.25, "test_loss": 2.0}
    check_loop(loop, path, 10)  # it goes on like a current one (tests/training/test_loop.py)


@pytest.mark.parametrize("edit,damaged", [
    (lambda loop: loop.sampler.update(order=torch.zeros(10, dtype=torch.long)), "sampler.order"),
    (lambda loop: loop.sampler.update(position=11), "sampler.position"),
    (lambda loop: loop.sampler.update(epoch=-1), "sampler.epoch"),
    (lambda loop: loop.window.update(lrs=[]), "window"),
    (lambda loop: loop.scores.update(precision="0.25"), "scores"),
])
def test_a_loop_state_edited_by_hand_is_refused_before_any_run_reopens(tmp_path, edit, damaged):
    loop = loop_state()
    check_loop(loop, tmp_path / "c.pt", 10)  # as saved: fine
    edit(loop)
    with pytest.raises(CheckpointError, match=f"its loop state is damaged \\({damaged}\\)"):
        check_loop(loop, tmp_path / "c.pt", 10)
