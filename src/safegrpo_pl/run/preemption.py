"""Stopping cleanly when the cluster asks: SIGTERM (preemption, `scancel`) or SIGUSR1 (what
SLURM sends before a time limit when asked to with `--signal=USR1@120`).

`PreemptionCheckpoint` only notes the signal in its handler. The rollout batch in progress
finishes (its sampling and every optimiser step it feeds), then the checkpoint is written and the
run stops. Why not stop after the current optimiser step: a checkpoint in the middle of a rollout
batch would have to carry the rollout (completions, rewards, old and reference log-probs); at the
batch boundary it needs nothing that the loops, the loader and the random state do not already
hold, and resuming from it gives exactly the run that was not stopped.

The file is Lightning's "HPC" checkpoint, `hpc_ckpt_<n>.ckpt` in `trainer.default_root_dir`:
on SLURM a requeued job started with the same command resumes from the newest one by itself;
elsewhere pass `--ckpt_path hpc` (or its path). Lightning's own SIGTERM handling still runs
(it stops the loop after the batch; under DDP it tells the other processes).

SIGUSR1 replaces Lightning's SLURM handler rather than calling it: that one writes its
checkpoint inside the signal handler, in the middle of a step, and requeues the job at once,
which can kill the run before the batch ends. Here the job is requeued (`scontrol requeue`,
when Lightning's SLURM auto-requeue is on) only after the checkpoint is written.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)

DEFAULT_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGUSR1")


def hpc_checkpoint_path(folder: str | Path) -> Path:
    """The next `hpc_ckpt_<n>.ckpt` in `folder` (Lightning resumes from the highest n)."""
    numbers = [
        int(m.group(1))
        for p in Path(folder).glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return Path(folder) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def requeue_command(environ: dict[str, str]) -> list[str] | None:
    """`scontrol requeue JOB` for the SLURM job (or array task) in `environ`; None off SLURM."""
    array_job = environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        job = f"{array_job}_{environ.get('SLURM_ARRAY_TASK_ID', '')}"
    else:
        job = environ.get("SLURM_JOB_ID", "")
    return ["scontrol", "requeue", job] if re.fullmatch(r"[0-9]+(_[0-9]+)?", job) else None


class PreemptionCheckpoint(Callback):
    """On a stop signal, finish the rollout batch, write a checkpoint, and end the run.

    Args:
        signals: names of the signals that ask for it.
    """

    def __init__(self, signals: tuple[str, ...] = DEFAULT_SIGNALS) -> None:
        super().__init__()
        self.signals = tuple(getattr(signal, name) for name in signals if hasattr(signal, name))
        self.received: int | None = None
        self.saved: Path | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        previous = self._previous.get(signum)
        if callable(previous) and signum != getattr(signal, "SIGUSR1", None):
            previous(signum, frame)  # Lightning's SIGTERM notice (see the module's docstring)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.received = None
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                log.debug("PreemptionCheckpoint: cannot handle %s outside the main thread", signum)

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        received = self._any_process_received(trainer)
        if not received:
            return
        name = signal.Signals(self.received).name if self.received else "a stop signal"
        self.saved = hpc_checkpoint_path(trainer.default_root_dir)
        trainer.save_checkpoint(self.saved)  # every process takes part; rank 0 writes
        rank_zero_info(
            f"{name} received: stopped after optimiser step {trainer.global_step} and wrote "
            f"{self.saved}; resume with --ckpt_path {self.saved} (or --ckpt_path hpc)"
        )
        self._restore_handlers()
        if self.received == getattr(signal, "SIGUSR1", None):
            self._requeue(trainer)
        raise SIGTERMException  # Lightning's way out: a clean exit, no traceback

    @staticmethod
    def _requeue(trainer: Trainer) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        command = requeue_command(dict(os.environ))
        if command is not None and trainer.is_global_zero:
            status = subprocess.call(command)
            rank_zero_info(f"{' '.join(command)}: exit status {status}")

    def _any_process_received(self, trainer: Trainer) -> bool:
        """Whether any process got the signal (all stop together, or the others would wait in
        the next collective forever)."""
        return bool(trainer.strategy.reduce_boolean_decision(self.received is not None, all=False))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException):
        self._restore_handlers()
