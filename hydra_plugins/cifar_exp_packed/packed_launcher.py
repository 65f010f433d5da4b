"""A sweep's jobs packed onto one device: `-m hydra/launcher=packed key=a,b,...`.

`mode=stacked` trains up to `jobs_per_device` jobs at once in this process, one thread per
job, their training steps taken together as one stacked step (cifar_exp.training.packing): one
launch where N jobs one after another would each launch their own. `mode=processes` runs
`jobs_per_device` jobs at a time as processes on each device (Hydra's joblib launcher);
`mode=sequential` one job after another (Hydra's basic launcher). `auto` takes stacked on a
GPU and sequential on the CPU, where neither way of packing was faster (docs/sweeps.md).

Either way every job stays a job of its own: its output folder and log, its MLflow child
run under the sweep's parent, its checkpoint, metrics and result; a member that diverges is
FAILED while the others go on; SIGINT/SIGTERM checkpoints every member, and the same command
with `resume=true` continues them all."""

from __future__ import annotations

import copy
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from cifar_exp.errors import ConfigError, refuse

log = logging.getLogger(__name__)
MODES = ("auto", "stacked", "processes", "sequential")


class PackedLauncher(Launcher):
    @staticmethod
    def check_options(options: dict[str, Any]) -> None:
        """Refuse, in one line, options this launcher cannot run with; called on the
        composed config before the sweep starts (and again when Hydra builds it)."""
        mode, jobs_per_device = options.get("mode", "auto"), options.get("jobs_per_device", 1)
        if mode not in MODES:
            raise ConfigError(f"hydra.launcher.mode={mode} is not one of {', '.join(MODES)}")
        if isinstance(jobs_per_device, bool) or not isinstance(jobs_per_device, int) \
                or jobs_per_device < 1:
            raise ConfigError(f"hydra.launcher.jobs_per_device={jobs_per_device} must be a "
                              f"positive integer")

    def __init__(self, mode: str = "auto", jobs_per_device: int = 8) -> None:
        try:
            self.check_options({"mode": mode, "jobs_per_device": jobs_per_device})
        except ConfigError as error:
            refuse(error)
        self.mode, self.jobs_per_device = mode, jobs_per_device
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        from cifar_exp.tracking.redact import install_redaction
        from cifar_exp.tracking.sweep import mask_sweep_record

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        install_redaction()  # the new handlers too: each job's overrides are logged
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        mask_sweep_record(sweep_dir)  # the sweeper's multirun.yaml, before any job runs
        mode = resolve_mode(self.mode)
        members = self._checked_members(job_overrides, initial_job_idx)  # whichever the mode
        if self.mode == "auto" and mode == "sequential":
            log.info("hydra/launcher=packed on the CPU: the %d jobs run one after another "
                     "(stacking pays on a GPU; hydra.launcher.mode=stacked stacks them here "
                     "too)", len(members))
        if mode == "processes":
            return self._in_processes(job_overrides, initial_job_idx)
        if mode == "sequential":
            return self._one_after_another(job_overrides, initial_job_idx)
        returns: list[JobReturn] = []
        for start in range(0, len(members), self.jobs_per_device):
            chunk = members[start : start + self.jobs_per_device]
            returns += self._pack(chunk, initial_job_idx + start)
        return returns

    def _checked_members(self, job_overrides: Sequence[Sequence[str]],
                         first_job: int) -> list[_Member]:
        """Every job of the sweep as a member, each checked: a bad job is refused before
        any job starts, in any mode, nothing half-trained."""
        from cifar_exp.errors import UserError

        members = [self._member(list(overrides), first_job + index)
                   for index, overrides in enumerate(job_overrides)]
        try:
            for member in members:
                check_before_training(member.cfg)
        except UserError as error:
            refuse(error)
        return members

    def _in_processes(self, job_overrides: Sequence[Sequence[str]],
                      initial_job_idx: int) -> Sequence[JobReturn]:
        """`jobs_per_device` processes per device; a job takes device number % devices."""
        import torch
        from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

        devices = torch.cuda.device_count() or 1
        launcher = JoblibLauncher(n_jobs=self.jobs_per_device * devices)
        launcher.setup(hydra_context=self.hydra_context, task_function=self.task_function,
                       config=self.config)
        return launcher.launch(job_overrides, initial_job_idx)

    def _one_after_another(self, job_overrides: Sequence[Sequence[str]],
                           initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        launcher = BasicLauncher()
        launcher.setup(hydra_context=self.hydra_context, task_function=self.task_function,
                       config=self.config)
        return launcher.launch(job_overrides, initial_job_idx)

    def _pack(self, members: list[_Member], first_job: int) -> list[JobReturn]:
        """Train these members as one pack, each in its thread; returns when all are done."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        from cifar_exp.errors import Stopped
        from cifar_exp.job.stop import StopRequest
        from cifar_exp.tracking.redact import install_redaction
        from cifar_exp.training.packing import Pack

        log.info("packing %d jobs onto one device (hydra/launcher=packed, mode=stacked)",
                 len(members))
        for member in members:  # made when its pack starts: a refused sweep leaves none
            Path(member.context.folder).mkdir(parents=True, exist_ok=True)
        logs = _MemberLogs(self.config, members)
        exits: list[int] = []
        with StopRequest() as stop, logs:
            install_redaction()  # on the handlers `logs` set up: the console, each member's file
            pack = Pack(len(members), stop, index=first_job // self.jobs_per_device)
            threads = [threading.Thread(target=member.run, args=(pack, index, exits),
                                        name=member.thread_name, daemon=True)
                       for index, member in enumerate(members)]
            steps = max(member.cfg.steps for member in members)
            # disable=None: drawn on a terminal only, never into a redirected stderr.
            with logging_redirect_tqdm(), tqdm(total=steps, unit="step", dynamic_ncols=True,
                                               desc=f"{len(members)} jobs packed",
                                               disable=None) as bar:
                for thread in threads:
                    thread.start()
                try:
                    for thread in threads:
                        while thread.is_alive():
                            thread.join(timeout=0.5)  # signals reach this (the main) thread
                            bar.update(pack.steps - bar.n)
                except Stopped as stopped:  # a second signal: no time for checkpoints
                    print(f"{stopped}: the members stop where they are, without a "
                          f"checkpoint", file=sys.stderr)
                    sys.exit(stopped.exit_code)
        for member in members:
            member.report()
        if exits:  # a member refused or stopped: the sweep ends as that job would alone
            sys.exit(exits[0])
        return [member.job_return for member in members]

    def _member(self, overrides: list[str], number: int) -> _Member:
        """The job's config, as Hydra's own launchers compose it, with its output folder
        (made when its pack starts)."""
        assert self.config is not None and self.hydra_context is not None
        from cifar_exp import run

        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                           overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{number}"
            sweep_config.hydra.job.num = number
        HydraConfig.instance().set_config(sweep_config)
        folder = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
            sweep_config.hydra.runtime.output_dir = os.path.abspath(folder)
        HydraConfig.instance().set_config(sweep_config)
        cfg = copy.deepcopy(sweep_config)
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        # Resolved now: ${hydra:...} reads a global that the next member's config replaces.
        OmegaConf.resolve(cfg)
        context = run.job_context(cfg)
        job_return = JobReturn(overrides=overrides, cfg=cfg,
                               hydra_cfg=copy.deepcopy(HydraConfig.instance().cfg),
                               working_dir=os.getcwd(), task_name=sweep_config.hydra.job.name)
        return _Member(cfg, context, job_return)


class _Member:
    """One job of a pack: its config, what Hydra decided for it, and how it ended."""

    def __init__(self, cfg: DictConfig, context: Any, job_return: JobReturn) -> None:
        self.cfg, self.context, self.job_return = cfg, context, job_return
        self.thread_name = f"job {context.job_number}"
        self.log_file = Path(context.folder) / f"{job_return.task_name}.log"

    def run(self, pack: Any, index: int, exits: list[int]) -> None:
        """The thread's work: the ordinary job, its step taken with the pack's."""
        import dataclasses

        from cifar_exp import run
        from cifar_exp.job.job import LauncherHooks
        from cifar_exp.job.sweep_job import run_in_sweep

        # The pack takes the member's steps with the others', holds the one stop request
        # (signals reach the main thread), places the pack on its GPU, and shows one bar.
        hooks = LauncherHooks(step_maker=pack.step_maker(index), stop=pack.stop,
                              device_slot=pack.index, shares_device=True)
        context = dataclasses.replace(self.context, hooks=hooks)
        try:
            # A member of a recorded sweep may need no training, or train in another folder.
            self.job_return.return_value = run_in_sweep(
                self.cfg, context, lambda found: run.run_and_report(self.cfg, found))
            self.job_return.status = JobStatus.COMPLETED
        except SystemExit as end:
            self.job_return.return_value = float("nan")
            self.job_return.status = JobStatus.COMPLETED
            if end.code:
                exits.append(int(end.code))
        except Exception as error:  # as Hydra's launchers do: the sweep goes on
            log.exception("job %s failed", self.context.job_number)
            self.job_return.return_value = error
            self.job_return.status = JobStatus.FAILED
        finally:
            pack.leave()

    def report(self) -> None:
        """One line, as Hydra's launchers log each job: its overrides and its result."""
        failed = self.job_return.status == JobStatus.FAILED
        # JobReturn.return_value raises a failed job's exception instead of giving it.
        outcome = (f"failed ({self.job_return._return_value})" if failed
                   else self.job_return.return_value)
        log.info("#%s %s: %s", self.context.job_number,
                 " ".join(filter_overrides(self.job_return.overrides or [])), outcome)


class _MemberLogs:
    """The sweep's job logging (console, levels) once, and each member's log file holding
    only the lines of its own thread."""

    def __init__(self, config: DictConfig, members: list[_Member]) -> None:
        self.config, self.members = config, members
        self.handlers: list[logging.Handler] = []

    def __enter__(self) -> _MemberLogs:
        job_logging = copy.deepcopy(self.members[0].job_return.hydra_cfg.hydra.job_logging)
        with read_write(job_logging), open_dict(job_logging):
            handlers = job_logging.get("handlers") or {}
            files = [name for name, handler in handlers.items() if "filename" in handler]
            formatter = handlers[files[0]].get("formatter") if files else None
            for name in files:
                del job_logging.handlers[name]
            job_logging.root.handlers = [name for name in job_logging.root.get("handlers", [])
                                         if name not in files]
        configure_log(job_logging, self.config.hydra.verbose)
        style = (job_logging.get("formatters") or {}).get(formatter or "", {}).get(
            "format", "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        root = logging.getLogger()
        for member in self.members:
            handler = logging.FileHandler(member.log_file)
            handler.setFormatter(logging.Formatter(style))
            handler.addFilter(_OfThread(member.thread_name))
            root.addHandler(handler)
            self.handlers.append(handler)
        return self

    def __exit__(self, *exc_info: object) -> None:
        root = logging.getLogger()
        for handler in self.handlers:
            root.removeHandler(handler)
            handler.close()


class _OfThread(logging.Filter):
    def __init__(self, thread_name: str) -> None:
        super().__init__()
        self.thread_name = thread_name

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName == self.thread_name


def check_before_training(cfg: DictConfig) -> None:
    """What a job would refuse before it trains, checked without its data: its values, its
    device, and what each part's builder makes of its options (a torch optimizer's own
    checks included)."""
    from cifar_exp.config import validate
    from cifar_exp.training.build import check_parts, resolve_device

    validate(cfg)
    check_parts(cfg, resolve_device(cfg.device))


def resolve_mode(mode: str) -> str:
    """`auto`: stacked on a GPU (one launch for all members' kernels), sequential on the CPU
    (where the cores are the limit: a stacked step took twice the members' steps one by
    one, and processes sharing the cores gained nothing)."""
    if mode != "auto":
        return mode
    import torch

    return "stacked" if torch.cuda.is_available() else "sequential"
