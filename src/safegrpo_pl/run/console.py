"""What a run prints: this package's messages, a step progress bar, a short model summary, and
none of the dependency notes that say nothing about a SafeGRPO run.

Every note silenced here was checked to be harmless for this project:
- Lightning's `LeafSpec` deprecation (its own code calls the old torch API);
- Lightning's tips to install litlogger / litmodels (advertisements);
- Lightning's note on `ModelCheckpoint` with manual optimisation: a step-based checkpoint holds
  the weights after the optimiser step, which is what a GRPO checkpoint should hold;
- Lightning's "The dirpath has changed" when `validate` / `test` / `predict` load a fit's
  checkpoint: the evaluation writes into a subfolder of the fit's folder on purpose
  (`run_dirs.logger_for`), and it saves no checkpoint;
- Lightning's "Experiment logs directory ... exists" and "Checkpoint directory ... exists": a
  resumed fit appends to its own folder (a fresh fit always gets a new one);
- Lightning's note that a model summary callback is configured (`PolicySummary`, ours);
- transformers' "Loading weights" / "Writing model shards" bars (a tiny model loads in a blink;
  hub downloads keep their own bar);
- bitsandbytes' failure to load the optional CPU `gemm_4bit` kernel at import: it only matters
  for 4-bit layers on the CPU, and the slower fallback is still correct;
- peft's note about `is_gradient_checkpointing`.
Our own warnings and every other dependency's are kept.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

HARMLESS_WARNINGS: tuple[str, ...] = (
    r".*isinstance\(treespec, LeafSpec\)",
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
    r"The dirpath has changed from",
    r"Experiment logs directory .* exists and is not empty",
    r"Checkpoint directory .* exists and is not empty",
    r".*is_gradient_checkpointing",
)
HARMLESS_LOG_LINES: tuple[str, ...] = (
    r"💡 Tip: For seamless cloud",
    r"Failed to load CPU gemm_4bit_forward",
    r"Trainer already configured with model summary callbacks",
    r".*is_gradient_checkpointing",
)
# Loggers that emit the lines above (logging filters apply where a record is created).
_NOISY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "bitsandbytes.backends.cpu.ops",
    "peft.peft_model",
    "peft.tuners.tuners_utils",
)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(re.match(pattern, message) for pattern in HARMLESS_LOG_LINES)


def silence_known_notes() -> None:
    """Hide the dependency notes listed in this module's docstring (others still show)."""
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless())
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


class _StderrNow(logging.StreamHandler):
    """A handler that writes to `sys.stderr` as it is when a message comes, not as it was when
    the handler was made (a command run twice in one process, under a redirected stderr, would
    otherwise write to the first run's stream after it was closed)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _: object) -> None:
        pass


def show_package_logs(level: int = logging.INFO) -> None:
    """Print this package's log messages (warm-up, data, exports) on the console, once."""
    logger = logging.getLogger("safegrpo_pl")
    if not logger.handlers:
        handler = _StderrNow()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimiser steps up to `trainer.max_steps`.

    Lightning's bar counts batches of an epoch ("Epoch 0/-2" when only `max_steps` is set); here
    one batch is one rollout that may feed several optimiser steps, and a run is sized in steps.
    The logger's version number (`v_num`) is left out. One bar lasts the whole fit: a new epoch
    (a pass over the training records) does not restart its clock, rate or time left (with
    `leave=True` Lightning closes the bar at each epoch's end, so each epoch gets a new one,
    still counting steps). The bar is set up when training starts, so a run resumed in the
    middle of an epoch (Lightning then skips that epoch's start) counts steps too.
    """

    _counting_steps = False  # whether the current bar has been set up to count steps

    @staticmethod
    def _sized_in_steps(trainer: Trainer) -> bool:
        return bool(trainer.max_steps and trainer.max_steps > 0)

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._counting_steps = False
        if self._sized_in_steps(trainer):
            self._count_steps(trainer)

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        if self._sized_in_steps(trainer) and self._counting_steps and not self._leave:
            return
        super().on_train_epoch_start(trainer, *args)
        if self._sized_in_steps(trainer):
            self._count_steps(trainer)

    def _count_steps(self, trainer: Trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = trainer.global_step  # a resumed run: the rate counts new steps
        bar.set_description("GRPO steps")
        bar.refresh()
        self._counting_steps = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        if not self._sized_in_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, *args)
            return
        bar = self.train_progress_bar
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module))
        bar.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class PolicySummary(ModelSummary):
    """Lightning's model summary in three lines, without its FLOPs column (always 0 here:
    Lightning counts FLOPs on an example input, and a SafeGRPO module has none)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        columns = dict(summary_data)
        for name, kind, params in zip(
            columns.get("Name", []),
            columns.get("Type", []),
            columns.get("Params", []),
            strict=False,
        ):
            if params.strip() not in ("0", ""):
                rank_zero_info(f"model: {name} ({kind}), {params} parameters")
        rank_zero_info(
            f"model: {trainable_parameters:,} trainable of {total_parameters:,} parameters "
            f"({model_size:.1f} MB)"
        )
