"""`safegrpo-pl fit|validate|test|predict|plan|evaluate --config FILE` (or
`python -m safegrpo_pl ...`): LightningCLI wiring, and the two commands that are not Trainer
commands (`plan`, `evaluate`).

YAML configs go through OmegaConf, so `${model.group_size}`-style interpolation works; any key
can be overridden on the command line (`--model.group_size 4 --trainer.max_steps 10`).

What this adds to LightningCLI:
- the format warm-up runs as a stage of its own before every subcommand;
- the default logger is CSV in `<trainer.default_root_dir>/logs/version_N`, so
  `--trainer.default_root_dir DIR` moves every output of a run (logs, checkpoints, exported
  model, report, predictions); a `trainer.logger` set in a config is used as given;
- `--ckpt_path last` finds the newest `last.ckpt` under `trainer.default_root_dir`, and a run
  from a fit's checkpoint writes into that fit's folder (`safegrpo_pl.run_dirs`);
- `predict` writes `predictions.jsonl` into the run's folder; the progress bar counts
  optimiser steps; the model summary is short (`safegrpo_pl.console`);
- the optimiser is the module's own (AdamW, `model.lr`, `model.lr_decay`), so there is no
  `--optimizer` / `--lr_scheduler`;
- the project's own errors (bad data, bad settings, a model that cannot be found) print as one
  message and exit with status 1; `--debug` or `SAFEGRPO_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI

from safegrpo_pl.checkpoints import check_cli_checkpoint
from safegrpo_pl.console import (
    PolicySummary,
    StepProgressBar,
    show_package_logs,
    silence_known_notes,
)
from safegrpo_pl.data import SafeTagDataModule
from safegrpo_pl.errors import DEBUG_FLAG, debug_requested, error_message, is_expected_error
from safegrpo_pl.exports import PredictionWriter
from safegrpo_pl.module import SafeGRPOModule
from safegrpo_pl.preemption import PreemptionCheckpoint
from safegrpo_pl.run_dirs import find_last_checkpoint, logger_for

log = logging.getLogger(__name__)

__all__ = ["SafeGRPOCLI", "main", "silence_known_notes"]


class SafeGRPOCLI(LightningCLI):
    """LightningCLI with the data's prompt encoder tied to the model being trained, the format
    warm-up run as a stage of its own before every subcommand, run folders that resumes and
    evaluations find again, a checkpoint checked before anything reads it, and a checkpoint
    written on SIGTERM / SIGUSR1."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The module builds its own optimiser (configure_optimizers): LightningCLI's automatic
        # --optimizer / --lr_scheduler would be ignored or break, so they are not offered.
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_core_arguments_to_parser(self, parser) -> None:
        """As LightningCLI's, but the project's options (model, data) come before the
        Trainer's in `--help`."""
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=False)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=False)
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        defaults = {f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"}
        parser.set_defaults(defaults)

    def add_arguments_to_parser(self, parser) -> None:
        # The prompts must be tokenised by the policy's own tokenizer and image processor.
        parser.link_arguments("model.policy.name_or_path", "data.processor")
        parser.link_arguments("model.policy.trust_remote_code", "data.trust_remote_code")

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint here first (for its hyper-parameters, which then
        # replace the configured model's): resolve `last`, then check the file, and that it is
        # the configured policy's, before that (`safegrpo_pl.checkpoints`).
        subcommand = self.config.get("subcommand")
        if subcommand:
            self._resolve_last(subcommand)
            path = self.config[subcommand].get("ckpt_path")
            if path and Path(path).is_file():
                check_cli_checkpoint(path, self.config[subcommand].get("model"))
        super()._parse_ckpt_path()

    def _resolve_last(self, subcommand: str) -> None:
        """Resolve `--ckpt_path last` to the newest `last.ckpt` of earlier runs."""
        config = self.config[subcommand]
        if config.get("ckpt_path") != "last":
            return
        root = config.get("trainer.default_root_dir") or os.getcwd()
        found = find_last_checkpoint(root)
        if found is not None:
            log.info("--ckpt_path last: %s", found)
            config["ckpt_path"] = str(found)
        elif subcommand == "fit":
            log.info("--ckpt_path last: no last.ckpt under %s yet; training from the start", root)
            config["ckpt_path"] = None
        else:
            raise FileNotFoundError(
                f"--ckpt_path last: there is no last.ckpt under trainer.default_root_dir "
                f"({root}). Run fit first, set --trainer.default_root_dir to the fit's folder, "
                "or pass the checkpoint's path."
            )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The configured Trainer, plus the defaults described in this module's docstring."""
        config = self._get(self.config_init, "trainer", default={})
        stage = self.subcommand or "fit"
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            ckpt = self._get(self.config_init, "ckpt_path") if self.subcommand else None
            kwargs["logger"] = logger_for(stage, config.get("default_root_dir"), ckpt)
        callbacks = list(config.get("callbacks") or [])
        present = {type(kind) for kind in callbacks}

        def has(kind: type) -> bool:
            return any(issubclass(c, kind) for c in present)

        if config.get("enable_progress_bar") is not False and not has(ProgressBar):
            callbacks.append(StepProgressBar())
        if config.get("enable_model_summary") is not False and not has(ModelSummary):
            callbacks.append(PolicySummary())
        if stage == "predict" and not has(BasePredictionWriter):
            callbacks.append(PredictionWriter())
        if not has(PreemptionCheckpoint):
            callbacks.append(PreemptionCheckpoint())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _warm_start(self) -> None:
        """Run (or reuse) the format warm-up on the train split before the Trainer starts."""
        if self.model.warmup is None:
            return
        data = self.datamodule
        self.model.warm_start(data.train_records(), data.encoder, data.warmup_key())

    def before_fit(self) -> None:
        self._warm_start()

    def before_validate(self) -> None:
        self._warm_start()

    def before_test(self) -> None:
        self._warm_start()

    def before_predict(self) -> None:
        self._warm_start()


# Subcommands that are not Trainer commands: each reads the same kind of YAML, with its own parser.
EXTRA_COMMANDS = {
    "plan": "safegrpo_pl.plan_cli",  # a per-GPU memory estimate of a `fit` config
    "evaluate": "safegrpo_pl.eval.cli",  # benchmarks, judges, base vs tuned report
    "judge": "safegrpo_pl.eval.judge_cli",  # any JSONL of answers through evaluate's judges
}


def main(args: Sequence[str] | None = None) -> Any:
    """Run the command line (`args` defaults to sys.argv[1:]): `plan` and `evaluate` go to
    their own entry points, the Trainer commands to LightningCLI."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    if args is None:  # LightningCLI reads sys.argv itself; it must not see --debug
        sys.argv[1:] = argv
    silence_known_notes()
    show_package_logs()
    if argv[:1] and argv[0] in EXTRA_COMMANDS:
        command = importlib.import_module(EXTRA_COMMANDS[argv[0]])
        return _report_expected_errors(lambda: command.main(argv[1:]), debug)
    return _report_expected_errors(
        lambda: SafeGRPOCLI(
            SafeGRPOModule,
            SafeTagDataModule,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            args=None if args is None else argv,
        ),
        debug,
    )


def _report_expected_errors(run: Callable[[], Any], debug: bool) -> Any:
    """`run()`, with the project's own errors printed as one message and exit status 1 (the
    traceback only with `--debug` or SAFEGRPO_DEBUG=1); anything unexpected propagates."""
    try:
        return run()
    except Exception as err:
        if debug or not is_expected_error(err):
            raise
        sys.stderr.write(error_message(err) + "\n")
        raise SystemExit(1) from None
