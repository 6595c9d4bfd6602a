"""A callback the signal tests load into the command line's process (`--trainer.callbacks+=`):
it sends the process a signal in the middle of a rollout batch, between two of its optimiser
steps, where a scheduler's signal could land; from outside, the moment could not be pinned."""

from __future__ import annotations

import os

from lightning.pytorch import Callback


class SignalAtStep(Callback):
    """Send `signum` to this process just before optimiser step `step` (1-based) runs."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)
