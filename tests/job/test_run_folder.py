"""The run folder: where a checkpoint may go, that it can be written, the .hydra record."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cifar_exp.errors import CheckpointError
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
