"""`SafeGRPOCLI`: LightningCLI for `fit`, `validate`, `test` and `predict`.

YAML configs go through OmegaConf, so `${model.group_size}`-style interpolation works; any key
can be overridden on the command line (`--model.group_size 4 --trainer.max_steps 10`).

What this adds to LightningCLI:
- the format warm-up runs as a stage of its own before every subcommand;
- the default logger is CSV in `<trainer.default_root_dir>/logs/version_N`, so
  `--trainer.default_root_dir DIR` moves every output of a run (logs, checkpoints, exported
  model, report, predictions); a `trainer.logger` set in a config is used as given, except that
  a resumed fit's CSV logger appends to its `metrics.csv` instead of wiping it;
- `--ckpt_path last` finds the newest `last.ckpt` under `trainer.default_root_dir`, and a run
  from a fit's checkpoint writes into that fit's folder (`safegrpo_pl.run.folders`);
- a strategy that needs a GPU, asked for on the CPU, is refused with the settings that run;
- a mistyped option prints one line with the closest known ones; abbreviations are refused;
- `predict` writes `predictions.jsonl` into the run's folder; the progress bar counts
  optimiser steps; the model summary is short (`safegrpo_pl.run.console`);
- the optimiser is the module's own (AdamW, `model.lr`, `model.lr_decay`), so there is no
  `--optimizer` / `--lr_scheduler`.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from safegrpo_pl.core.errors import OneLineParserErrors
from safegrpo_pl.run.console import (
    PolicySummary,
    StepProgressBar,
)
from safegrpo_pl.run.exports import PredictionWriter
from safegrpo_pl.run.folders import (
    find_hpc_checkpoint,
    find_last_checkpoint,
    keep_logged_rows,
    logger_for,
)
from safegrpo_pl.run.preemption import INTERRUPTED_EXIT, PreemptionCheckpoint
from safegrpo_pl.train.checkpoints import AtomicCheckpointIO, check_cli_checkpoint

log = logging.getLogger(__name__)


class NothingToTrainError(ValueError):
    """A resumed fit whose `max_steps` the checkpoint has already reached."""


# Lightning strategies that need a CUDA GPU (FSDP1 and DeepSpeed).
GPU_ONLY_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")
CPU_STRATEGIES = (
    "FSDP2 (sharded, as configs/qwen-full.yaml on GPUs): --trainer.devices 2 "
    "--trainer.strategy ModelParallelStrategy --trainer.strategy.data_parallel_size 2 "
    "--trainer.strategy.tensor_parallel_size 1; or data parallel: --trainer.devices 2 "
    "--trainer.strategy ddp"
)


def strategy_class_name(strategy: Any) -> str:
    """The class name of a `trainer.strategy` setting: a registered name ('fsdp'), a
    `class_path` section, or an instance."""
    from lightning.pytorch.strategies import StrategyRegistry

    if isinstance(strategy, str):
        known = strategy in StrategyRegistry  # its .get() builds the strategy: not wanted here
        return StrategyRegistry[strategy]["strategy"].__name__ if known else strategy
    class_path = getattr(strategy, "class_path", None) or (
        strategy.get("class_path") if isinstance(strategy, dict) else None
    )
    return str(class_path).rsplit(".", 1)[-1] if class_path else type(strategy).__name__


def check_strategy(strategy: Any, accelerator: Any, gpu_available: bool) -> None:
    """Refuse, before Lightning does with a traceback, a strategy that needs a GPU on a run
    that has none; the error names the settings that run here."""
    name = strategy_class_name(strategy)
    on_cpu = str(accelerator) == "cpu" or (str(accelerator) == "auto" and not gpu_available)
    if name in GPU_ONLY_STRATEGIES and on_cpu:
        shown = strategy if isinstance(strategy, str) else name
        raise ValueError(
            f"trainer.strategy is {shown!r} (Lightning's {name}), which needs a CUDA GPU, and "
            f"this run is on the CPU (trainer.accelerator {accelerator!r}). What runs here: "
            f"{CPU_STRATEGIES}."
        )


class CommandLineParser(OneLineParserErrors, LightningArgumentParser):
    """LightningCLI's parser, with one-line errors and no abbreviated options."""


class SafeGRPOCLI(LightningCLI):
    """LightningCLI with the data's prompt encoder tied to the model being trained, the format
    warm-up run as a stage of its own before every subcommand, run folders that resumes and
    evaluations find again, a checkpoint checked before anything reads it, and a checkpoint
    written on SIGTERM / SIGUSR1."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The module builds its own optimiser (configure_optimizers): LightningCLI's automatic
        # --optimizer / --lr_scheduler would be ignored or break, so they are not offered.
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", CommandLineParser)
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
        # the configured policy's, before that (`safegrpo_pl.train.checkpoints`).
        subcommand = self.config.get("subcommand")
        self.run_folder = None
        if subcommand:
            self._resolve_last(subcommand)
            config = self.config[subcommand]
            path = config.get("ckpt_path")
            if path and Path(path).is_file():
                facts = check_cli_checkpoint(path, config.get("model"))
                self.run_folder = facts.run_folder
                max_steps = config.get("trainer.max_steps")
                if (
                    subcommand == "fit"
                    and max_steps is not None
                    and 0 <= max_steps <= facts.global_step
                ):
                    raise NothingToTrainError(
                        f"--ckpt_path {path} is at optimiser step {facts.global_step} and "
                        f"--trainer.max_steps is {max_steps}: nothing to train. Set "
                        f"--trainer.max_steps above {facts.global_step} to continue the run."
                    )
        configured = self._model_settings(subcommand)
        super()._parse_ckpt_path()
        replaced = replaced_settings(configured, self._model_settings(subcommand))
        if replaced:
            log.warning(
                "--ckpt_path %s: the checkpoint's own model settings replace the configured "
                "ones (Lightning resumes a run as it was trained): %s. To train with other "
                "model settings, start a new run from its exported model instead.",
                self.config[subcommand].get("ckpt_path"),
                "; ".join(replaced),
            )

    def _model_settings(self, subcommand: str | None) -> dict[str, Any]:
        """The parsed model settings, nested ones under dotted keys (jsonargparse's own)."""
        model = self.config[subcommand].get("model") if subcommand else None
        return dict(model.items()) if model is not None else {}

    def _resolve_last(self, subcommand: str) -> None:
        """Resolve `--ckpt_path last` to the newest `last.ckpt` of earlier runs, and `hpc` to the
        newest HPC checkpoint (so that the run continues the folder it names)."""
        config = self.config[subcommand]
        root = config.get("trainer.default_root_dir") or os.getcwd()
        if config.get("ckpt_path") == "hpc":
            hpc = find_hpc_checkpoint(root)
            if hpc is not None:
                config["ckpt_path"] = str(hpc)
            return
        if config.get("ckpt_path") != "last":
            return
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
        check_strategy(
            config.get("strategy", "auto"),
            config.get("accelerator", "auto"),
            gpu_available=torch.cuda.is_available(),
        )
        stage = self.subcommand or "fit"
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            ckpt = self._get(self.config_init, "ckpt_path") if self.subcommand else None
            run_folder = getattr(self, "run_folder", None)
            kwargs["logger"] = logger_for(stage, config.get("default_root_dir"), ckpt, run_folder)
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
        if not config.get("plugins") and "plugins" not in kwargs and _plain_strategy(config):
            kwargs["plugins"] = [AtomicCheckpointIO()]  # whole-or-nothing checkpoint files
        trainer = super().instantiate_trainer(**kwargs)
        if stage == "fit" and self._get(self.config_init, "ckpt_path"):
            keep_logged_rows(trainer.loggers)  # a configured CSVLogger would wipe its rows
        return trainer

    def _warm_start(self) -> None:
        """Run (or reuse) the format warm-up on the train split before the Trainer starts."""
        if self.model.warmup is None:
            return
        data = self.datamodule
        self.model.warm_start(data.train_records(), data.encoder, data.warmup_key())

    def before_fit(self) -> None:
        self._warm_start()

    def after_fit(self) -> None:
        """Exit with the shell's Ctrl-C status after a Ctrl-C stop (its checkpoint written)."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, PreemptionCheckpoint) and callback.stopped_by == signal.SIGINT:
                raise SystemExit(INTERRUPTED_EXIT)

    def before_validate(self) -> None:
        self._warm_start()

    def before_test(self) -> None:
        self._warm_start()

    def before_predict(self) -> None:
        self._warm_start()


def replaced_settings(configured: dict[str, Any], resumed: dict[str, Any]) -> list[str]:
    """`model.KEY configured -> resumed` for each model setting (dotted keys) that resuming from
    a checkpoint changed, so the run can say which of the user's settings it is not using."""
    return [
        f"model.{key} {configured.get(key)!r} -> {resumed.get(key)!r}"
        for key in sorted(configured.keys() | resumed.keys())
        if configured.get(key) != resumed.get(key)
    ]


def _plain_strategy(trainer_config: Any) -> bool:
    """Whether the strategy writes one checkpoint file through a `CheckpointIO` (single
    process, DDP); FSDP2 (`ModelParallelStrategy`) writes sharded folders of its own."""
    name = strategy_class_name(trainer_config.get("strategy") or "auto")
    return name not in ("ModelParallelStrategy", *GPU_ONLY_STRATEGIES)
