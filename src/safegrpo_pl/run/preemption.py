"""Stopping cleanly, whatever stops the run: the end of `max_steps`, Ctrl-C (SIGINT), SIGTERM
(preemption, `scancel`) or SIGUSR1 (what SLURM sends before a time limit when asked to with
`--signal=USR1@120`).

The checkpoint of the last step is written at the end of that step's rollout batch, exactly as a
checkpoint in the middle of a run: Lightning's own end-of-fit `last.ckpt` is written after the
epoch has been counted as finished, so a longer run resumed from it would start the next
epoch's order and train on other prompts. A resumed run overwrites its own `last.ckpt` rather
than adding `last-v1.ckpt`.

`PreemptionCheckpoint` only notes a signal in its handler. The rollout batch in progress
finishes (its sampling and every optimiser step it feeds), then the checkpoint is written and the
run stops. Why not stop after the current optimiser step: a checkpoint in the middle of a rollout
batch would have to carry the rollout (completions, rewards, old and reference log-probs); at the
batch boundary it needs nothing that the loops, the loader and the random state do not already
hold, and resuming from it gives exactly the run that was not stopped.

Ctrl-C writes the run's `last.ckpt` (or an HPC checkpoint without a `ModelCheckpoint` that
keeps one) and names the command that resumes; a second Ctrl-C stops at once. The other
signals write Lightning's "HPC" checkpoint, `hpc_ckpt_<n>.ckpt` in `trainer.default_root_dir`:
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
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)

DEFAULT_SIGNALS: tuple[str, ...] = ("SIGINT", "SIGTERM", "SIGUSR1")
INTERRUPTED_EXIT = 130  # the shell's status for a command stopped by Ctrl-C


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
        self._trainer: Trainer | None = None
        self.stopped_by: int | None = None
        self.signals = tuple(getattr(signal, name) for name in signals if hasattr(signal, name))
        self.received: int | None = None
        self.saved: Path | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            if self.received == signal.SIGINT:  # the second Ctrl-C: stop now
                self._restore_handlers()
                raise KeyboardInterrupt
            sys.stderr.write(
                "\nCtrl-C: finishing this rollout batch, then writing a checkpoint "
                "(Ctrl-C again stops at once, losing the steps since the last checkpoint)\n"
            )
        self.received = signum
        previous = self._previous.get(signum)
        if callable(previous) and signum == getattr(signal, "SIGTERM", None):
            previous(signum, frame)  # Lightning's SIGTERM notice (see the module's docstring)

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.received = None
        self.stopped_by = None
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                log.debug("PreemptionCheckpoint: cannot handle %s outside the main thread", signum)
        if trainer.ckpt_path:  # a resumed run keeps its `last.ckpt` name
            for callback in _last_keepers(trainer):
                last = Path(callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST))
                if last.is_file():
                    callback.last_model_path = str(last)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        received = self._any_process_received(trainer)
        final = 0 < trainer.max_steps <= trainer.global_step
        if not (received or final):
            return
        saved = _save_last(trainer)
        if not received:
            return
        signum = self.received
        name = signal.Signals(signum).name if signum else "a stop signal"
        if signum == signal.SIGINT and saved:
            self.saved = saved[0]
            how = "--ckpt_path last"
        else:
            self.saved = hpc_checkpoint_path(trainer.default_root_dir)
            trainer.save_checkpoint(self.saved)  # every process takes part; rank 0 writes
            how = f"--ckpt_path {self.saved} (or --ckpt_path hpc)"
        rank_zero_info(
            f"{name} received: stopped after optimiser step {trainer.global_step} and wrote "
            f"{self.saved}; resume with: {resume_command(sys.argv, how)}"
        )
        self._restore_handlers()
        if signum == getattr(signal, "SIGUSR1", None):
            self._requeue(trainer)
        self.stopped_by = signum
        # Stop after this batch, once Lightning has logged it (raising here would lose its row).
        trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        """The run's folder, so that a run resumed from an HPC checkpoint (saved outside it)
        continues it."""
        trainer = self._trainer
        logger = trainer.logger if trainer is not None else None
        return {"run_folder": getattr(logger, "log_dir", None) if logger is not None else None}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

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


def _last_keepers(trainer: Trainer) -> list[ModelCheckpoint]:
    return [
        c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.save_last
    ]


def _save_last(trainer: Trainer) -> list[str]:
    """Write every `ModelCheckpoint`'s `last.ckpt` now, at the end of a rollout batch (where a
    mid-run checkpoint is written), unless it writes one at this step by its own schedule;
    returns the paths."""
    paths = []
    for callback in _last_keepers(trainer):
        every = callback._every_n_train_steps
        if not (every >= 1 and trainer.global_step % every == 0):
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
        paths.append(callback.last_model_path)
    return [p for p in paths if p]


def resume_command(argv: list[str], how: str) -> str:
    """The command that was run, with `--ckpt_path` replaced by `how`."""
    args, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if arg.startswith("--ckpt_path="):
            continue
        args.append(arg)
    program = (
        "python -m safegrpo_pl"
        if argv and argv[0].endswith(("__main__.py", "safegrpo_pl"))
        else "safegrpo-pl"
    )
    return " ".join([program, *args, how])
