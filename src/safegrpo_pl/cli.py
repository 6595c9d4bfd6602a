"""`python -m safegrpo_pl fit|validate|test|predict --config FILE`: LightningCLI wiring.

YAML configs go through OmegaConf, so `${model.group_size}`-style interpolation works; any key
can be overridden on the command line (`--model.group_size 4 --trainer.max_steps 10`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from safegrpo_pl.checkpoints import check_cli_checkpoint
from safegrpo_pl.data import SafeTagDataModule
from safegrpo_pl.module import SafeGRPOModule
from safegrpo_pl.preemption import PreemptionCheckpoint


class SafeGRPOCLI(LightningCLI):
    """LightningCLI with the data's prompt encoder tied to the model being trained, the
    format warm-up run as a stage of its own before every subcommand, a checkpoint checked
    before anything reads it, and a checkpoint written on SIGTERM / SIGUSR1."""

    def add_arguments_to_parser(self, parser) -> None:
        # The prompts must be tokenised by the policy's own tokenizer and image processor.
        parser.link_arguments("model.policy.name_or_path", "data.processor")
        parser.link_arguments("model.policy.trust_remote_code", "data.trust_remote_code")

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint here first (for its hyper-parameters, which then
        # replace the configured model's): check the file, and that it is the configured
        # policy's, before that (`safegrpo_pl.checkpoints`).
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            check_cli_checkpoint(path, self.config[subcommand].get("model"))
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, PreemptionCheckpoint) for c in trainer.callbacks):
            trainer.callbacks.append(PreemptionCheckpoint())
        return trainer

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


def main(args: Sequence[str] | None = None) -> SafeGRPOCLI:
    """Run the command line (`args` defaults to sys.argv)."""
    silence_known_notes()
    return SafeGRPOCLI(
        SafeGRPOModule,
        SafeTagDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
    )
