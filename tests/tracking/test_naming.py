"""What runs are called and tagged with: names, the launching command, how long ago the
interpreter started, the git commit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from cifar_exp.tracking.naming import (
    command_line,
    git_tags,
    logged_model_name,
    short_keys,
    short_number,
    torchrun_arguments,
)


def test_keys_are_shown_by_their_last_part_unless_two_end_alike():
    assert short_keys(["optimizer.lr", "seed"]) == ["lr", "seed"]
    assert short_keys(["optimizer.weight_decay", "model.weight_decay", "seed"]) == [
        "optimizer.weight_decay", "model.weight_decay", "seed"]


def test_real_numbers_are_cut_to_four_digits_and_the_rest_kept():
    assert short_number("0.00013869861245357332") == "0.0001387"
    assert short_number("128") == "128" and short_number("adam") == "adam"
    assert short_number("1e-3") == "0.001" and short_number("2.5") == "2.5"


def test_a_run_name_becomes_a_model_name_mlflow_takes():
    assert logged_model_name("tf_cnn-adam lr=0.003 #2") == "tf_cnn-adam lr=0_003 #2"
    assert logged_model_name('a/b:c%d"e\'f') == "a_b_c_d_e_f"


def git(folder: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_git_tags_name_the_commit_and_whether_tracked_files_changed(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "train.py").write_text("steps = 1\n")
    git(repo, "add", "train.py")
    git(repo, "commit", "-q", "-m", "first")
    commit = git(repo, "rev-parse", "HEAD")
    assert git_tags.__wrapped__(repo) == {"mlflow.source.git.commit": commit,
                                          "git_dirty": "false"}
    (repo / "train.py").write_text("steps = 2\n")
    assert git_tags.__wrapped__(repo)["git_dirty"] == "true"
    (tmp_path / "plain").mkdir()
    assert git_tags.__wrapped__(tmp_path / "plain") == {}  # not a git work tree


def test_command_line_under_torchrun_is_the_torchrun_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run.py", "steps=5"])
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert command_line() == "python -m cifar_exp.run steps=5"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/cifar-exp", "steps=5"])
    assert command_line() == "cifar-exp steps=5"  # started by its console script
    # A stand-in for torchrun: a process whose command line names it.
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                 "/venv/bin/torchrun", "--nproc_per_node=2", "-m",
                                 "cifar_exp.run", "steps=5"])
    try:
        cmdline = Path(f"/proc/{launcher.pid}/cmdline")
        deadline = time.monotonic() + 30
        while not cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)  # a process just started shows its command line a moment later
        assert torchrun_arguments(launcher.pid) == ["--nproc_per_node=2", "-m",
                                                    "cifar_exp.run", "steps=5"]
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
        monkeypatch.setattr(os, "getppid", lambda: launcher.pid)
        assert command_line() == "torchrun --nproc_per_node=2 -m cifar_exp.run steps=5"
    finally:
        launcher.kill()
        launcher.wait()
    assert torchrun_arguments(os.getpid()) is None  # pytest is not torchrun
