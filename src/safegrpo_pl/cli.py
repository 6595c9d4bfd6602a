"""`python -m safegrpo_pl fit|validate|test|predict --config FILE`: LightningCLI wiring.

YAML configs go through OmegaConf, so `${model.group_size}`-style interpolation works; any key
can be overridden on the command line (`--model.group_size 4 --trainer.max_steps 10`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from safegrpo_pl.data import SafeTagDataModule
from safegrpo_pl.module import SafeGRPOModule


class SafeGRPOCLI(LightningCLI):
    """LightningCLI with the data's prompt encoder tied to the model being trained."""

    def add_arguments_to_parser(self, parser) -> None:
        # The prompts must be tokenised by the policy's own tokenizer and image processor.
        parser.link_arguments("model.model_name_or_path", "data.processor")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")


# Lightning's note for manual optimisation: a step-based checkpoint holds the weights after the
# optimiser step. That is what a GRPO checkpoint should hold, so the 15-line note is noise.
_MANUAL_OPTIMISATION_NOTE = "Using ModelCheckpoint with manual optimization and every_n_train_steps"


def silence_known_notes() -> None:
    """Hide the dependency notes that say nothing about a SafeGRPO run (others still show)."""
    warnings.filterwarnings("ignore", message=_MANUAL_OPTIMISATION_NOTE)


def main(args: Sequence[str] | None = None) -> SafeGRPOCLI | dict:
    """Run the command line (`args` defaults to sys.argv); `evaluate` goes to the evaluation's
    own parser (`safegrpo_pl.eval.cli`), the rest to LightningCLI."""
    argv = list(args) if args is not None else sys.argv[1:]
    if argv[:1] == ["evaluate"]:
        from safegrpo_pl.eval.cli import main as evaluate_main

        return evaluate_main(argv[1:])
    silence_known_notes()
    return SafeGRPOCLI(
        SafeGRPOModule,
        SafeTagDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
    )
