"""`python -m safegrpo_pl fit|validate|test|predict|plan|evaluate --config FILE`: LightningCLI wiring.

YAML configs go through OmegaConf, so `${model.group_size}`-style interpolation works; any key
can be overridden on the command line (`--model.group_size 4 --trainer.max_steps 10`).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningCLI

from safegrpo_pl.data import SafeTagDataModule
from safegrpo_pl.module import SafeGRPOModule


class SafeGRPOCLI(LightningCLI):
    """LightningCLI with the data's prompt encoder tied to the model being trained, and the
    format warm-up run as a stage of its own before every subcommand."""

    def add_arguments_to_parser(self, parser) -> None:
        # The prompts must be tokenised by the policy's own tokenizer and image processor.
        parser.link_arguments("model.policy.name_or_path", "data.processor")
        parser.link_arguments("model.policy.trust_remote_code", "data.trust_remote_code")

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


# Lightning's note for manual optimisation: a step-based checkpoint holds the weights after the
# optimiser step. That is what a GRPO checkpoint should hold, so the 15-line note is noise.
_MANUAL_OPTIMISATION_NOTE = "Using ModelCheckpoint with manual optimization and every_n_train_steps"


def silence_known_notes() -> None:
    """Hide the dependency notes that say nothing about a SafeGRPO run (others still show)."""
    warnings.filterwarnings("ignore", message=_MANUAL_OPTIMISATION_NOTE)


# Subcommands that are not Trainer commands: each reads the same kind of YAML, with its own parser.
EXTRA_COMMANDS = {
    "plan": "safegrpo_pl.plan_cli",  # a per-GPU memory estimate of a `fit` config
    "evaluate": "safegrpo_pl.eval.cli",  # benchmarks, judges, base vs tuned report
}


def main(args: Sequence[str] | None = None) -> Any:
    """Run the command line (`args` defaults to sys.argv): `plan` and `evaluate` go to their
    own entry points, the Trainer commands to LightningCLI."""
    argv = list(args) if args is not None else sys.argv[1:]
    if argv[:1] and argv[0] in EXTRA_COMMANDS:
        return importlib.import_module(EXTRA_COMMANDS[argv[0]]).main(argv[1:])
    silence_known_notes()
    return SafeGRPOCLI(
        SafeGRPOModule,
        SafeTagDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
    )
