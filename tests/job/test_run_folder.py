"""The run folder: where a checkpoint may go, that it can be written, the .hydra record."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cifar_exp.errors import CheckpointError, UserError
from cifar_exp.job.locks import Locked
from cifar_exp.job.run_folder import (
    check_writable,
    checkpoint_destination,
    checkpoint_lock,
    folder_lock,
    record_config,
)


def test_the_default_destination_is_in_the_run_folder(tmp_path):
    assert checkpoint_destination(None, None, tmp_path, None) == tmp_path / "checkpoint.pt"
    kept = tmp_path / "kept.pt"
    kept.write_bytes(b"x")
    # A resumed run keeps writing to the file it resumed from.
    assert checkpoint_destination(None, kept, tmp_path, None) == kept
    assert checkpoint_destination(str(kept), kept, tmp_path, None) == kept


@pytest.mark.parametrize("case,message", [
    ("folder", "is a folder; name a file in it"),
    ("store", "is the MLflow store itself; choose another file"),
    ("new run, file exists", "exists: if it is an interrupted run's checkpoint, resume=true "
                             "continues that run"),
    ("resumed, another file", "exists and is not the checkpoint this run resumes from"),
])
def test_destinations_that_would_destroy_data_are_refused(tmp_path, case, message):
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"the store")
    other = tmp_path / "other.pt"
    other.write_bytes(b"another run's checkpoint")
    resumed = tmp_path / "run" / "checkpoint.pt"
    resumed.parent.mkdir()
    resumed.write_bytes(b"this run's checkpoint")
    configured, resumed_from = {
        "folder": (str(tmp_path), None),
        "store": (str(store), resumed),
        "new run, file exists": (str(other), None),
        "resumed, another file": (str(other), resumed),
    }[case]
    with pytest.raises(CheckpointError, match=message):
        checkpoint_destination(configured, resumed_from, tmp_path / "run", store)
    assert store.read_bytes() == b"the store" and other.read_bytes() == b"another run's checkpoint"


def test_an_unwritable_destination_is_refused_before_training(tmp_path):
    check_writable(tmp_path / "new" / "checkpoint.pt")  # a folder that can be made
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"checkpoints cannot be written to .*file: it is "
                                              r"a file, not a folder; choose another"):
        check_writable(a_file / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"cannot be written to /proc/self \("):
        check_writable(Path("/proc/self/checkpoint.pt"))  # refused even to root


def test_one_process_at_a_time_in_a_folder_and_on_a_checkpoint(tmp_path):
    with folder_lock(tmp_path), checkpoint_lock(tmp_path / "c.pt"):
        # flock locks belong to an open file: a second open in this process conflicts too.
        with pytest.raises(Locked, match=rf"{tmp_path} is in use: another process is running "
                                         rf"a job there"), folder_lock(tmp_path):
            pass
        with pytest.raises(Locked, match="checkpoint .*c.pt is in use"), \
                checkpoint_lock(tmp_path / "c.pt"):
            pass


def test_the_record_is_hydras_with_credentials_masked(tmp_path):
    cfg = OmegaConf.create({"steps": 5, "tracking": {"uri": "http://u:secret@h:5000"}})
    hydra = OmegaConf.create({"run": {"dir": str(tmp_path)}})
    overrides = ["steps=5", "tracking.uri=http://u:secret@h:5000"]
    record_config(tmp_path, cfg, hydra, overrides, replace=True)
    record = tmp_path / ".hydra"
    assert yaml.safe_load((record / "config.yaml").read_text()) == {
        "steps": 5, "tracking": {"uri": "http://***@h:5000"}}
    assert yaml.safe_load((record / "overrides.yaml").read_text()) == [
        "steps=5", "tracking.uri=http://***@h:5000"]
    assert yaml.safe_load((record / "hydra.yaml").read_text()) == {
        "hydra": {"run": {"dir": str(tmp_path)}}}
    # A resumed run keeps the record its first job wrote.
    record_config(tmp_path, OmegaConf.create({"steps": 9}), hydra, ["steps=9"], replace=False)
    assert yaml.safe_load((record / "overrides.yaml").read_text())[0] == "steps=5"


@pytest.mark.parametrize("lock", ["folder", "checkpoint"])
def test_a_lock_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, lock):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"keep me")
    folder = tmp_path / "run"
    folder.mkdir()
    link = folder / (".lock" if lock == "folder" else ".checkpoint.pt.lock")
    link.symlink_to(target)
    taking = folder_lock(folder) if lock == "folder" else checkpoint_lock(folder / "checkpoint.pt")
    with pytest.raises(UserError, match=rf"{link} is a symbolic link; a lock file must be a "
                                        rf"plain file: remove the link"), taking:
        pytest.fail("locked through a link")
    assert target.read_bytes() == b"keep me" and link.is_symlink()


def test_the_record_never_writes_through_a_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "config.yaml"
    target.write_bytes(b"keep me")
    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").symlink_to(target)
    record_config(folder, OmegaConf.create({"steps": 5}), OmegaConf.create({}), [], replace=True)
    assert yaml.safe_load((folder / ".hydra" / "config.yaml").read_text()) == {"steps": 5}
    assert target.read_bytes() == b"keep me"  # the link was replaced, not written through
    # A record folder that is a link is refused, already when the folder is locked.
    other = tmp_path / "other"
    other.mkdir()
    (other / ".hydra").symlink_to(elsewhere)
    message = rf"{other / '.hydra'} is a symbolic link; a run's record must be a plain folder"
    with pytest.raises(UserError, match=message):
        folder_lock(other)
    with pytest.raises(UserError, match=message):
        record_config(other, OmegaConf.create({}), OmegaConf.create({}), [], replace=True)
    assert os.listdir(elsewhere) == ["config.yaml"] and target.read_bytes() == b"keep me"
