"""The fit report's Lightning callback: held-out figures before and after fit, curves, files.

`SafetyReport` evaluates the held-out split when fit starts ("before") and when training ends
("after"), collects the curves over steps, and writes `curves.png`, `summary.md` and
`summary.json` (see `safegrpo_pl.run.report`), then says where they are. At each of those
evaluations and at each validation it also keeps a few completions per source, written to
`completions.jsonl`, sent to the loggers that show tables, and shown in `summary.md` with
thumbnails (see `safegrpo_pl.run.gallery`). The callbacks that export
the trained policy and the predictions are in `safegrpo_pl.run.exports`.

It talks to the user (where the files are), which is what callbacks are for; it does so through
Lightning's rank-zero logging so that only one process speaks. On several processes each rank
evaluates its shard of the held-out split (all shards the same size, so ranks with sharded
weights decode alike; the padding is not counted), the results are gathered on every rank, and
only rank 0 writes; what needs a collective (`trainer.log_dir` broadcasts) is computed on
every rank first.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler

from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.core.rewards import RewardParts
from safegrpo_pl.data.rank_padding import real_positions
from safegrpo_pl.rl.distributed import is_distributed, world_size
from safegrpo_pl.run.curves import TrainingHistory
from safegrpo_pl.run.gallery import (
    ExampleCollector,
    append_jsonl,
    examples_markdown,
    gallery_rows,
    log_completion_table,
)
from safegrpo_pl.run.report import (
    EvalSummary,
    summarize_by_novelty,
    summarize_by_source,
    summarize_evaluation,
    write_report,
)
from safegrpo_pl.train.module import HELD_BACK, EvalOutputs

# What the report keeps of each training step's logged scalars.
TRAIN_HISTORY_KEYS: tuple[str, ...] = (
    "train/reward",
    "train/reward_format",
    "train/reward_tag",
    "train/reward_behavior",
    "train/kl",
    "train/clip_frac",
    "train/completion_length",
    "train/zero_var_groups",
)
VAL_HISTORY_KEYS: tuple[str, ...] = (
    "val/reward",
    "val/safety_score",
    "val/refusal_rate",
    "val/compositional_safety_score",
    "val/format_rate",
    "val/combined_tag_acc",
)
# EvalSummary field -> the key of the same figure in the validation history.
_SUMMARY_TO_VAL: dict[str, str] = {
    "mean_reward": "val/reward",
    "safety_score": "val/safety_score",
    "refusal_rate": "val/refusal_rate",
    "compositional_safety_score": "val/compositional_safety_score",
    "format_rate": "val/format_rate",
    "combined_tag_acc": "val/combined_tag_acc",
}


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().item() if value.numel() == 1 else None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _texts(rollout: Any, count: int) -> list[str]:
    """The decoded responses of a rollout ("" each when it carries none)."""
    texts = getattr(rollout, "texts", None)
    return list(texts) if texts is not None else [""] * count


def evaluate_split(
    module: LightningModule, batches: Any, *, max_batches: int | None = None
) -> tuple[list[RewardParts], list[SafetyRecord], list[str]]:
    """One response per record of `batches` via `module.evaluate_batch`, scored; no grad.

    Args:
        module: a `SafeGRPOModule` (anything with `evaluate_batch(batch) -> (rollout, parts)`).
        batches: an iterable of `PromptBatch` (a validation dataloader).
        max_batches: stop after this many batches (None: all).

    Returns:
        (parts, records, responses), aligned.
    """
    parts: list[RewardParts] = []
    records: list[SafetyRecord] = []
    texts: list[str] = []
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            batch = batch.to(module.device)
            rollout, scored = module.evaluate_batch(batch)
            keep = real_positions(batch.records)  # padding to a multiple of the ranks
            responses = _texts(rollout, len(scored))
            parts.extend(scored[i] for i in keep)
            records.extend(batch.records[i] for i in keep)
            texts.extend(responses[i] for i in keep)
    return parts, records, texts


def _dropped_records(trainer: Trainer) -> dict[str, int]:
    """Records the datamodule left out at setup, by kind ({} when it counts none)."""
    return dict(getattr(trainer.datamodule, "bad_record_counts", None) or {})


def rank_shard(loader: DataLoader, trainer: Trainer) -> DataLoader:
    """This rank's part of an evaluation `loader` (itself when there is one rank).

    The datamodule pads evaluation splits to a multiple of the ranks, so every shard has as
    many batches as every other.
    """
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    if int(kwargs.get("num_replicas", 1)) < 2:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=DistributedSampler(loader.dataset, **kwargs, shuffle=False),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
    )


def gather_evaluations(
    parts: list[RewardParts], records: list[SafetyRecord]
) -> tuple[list[RewardParts], list[SafetyRecord]]:
    """Every rank's scored records, on every rank (images left behind: only labels count)."""
    if not is_distributed():
        return parts, records
    light = [dataclasses.replace(r, image=None) for r in records]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, (parts, light))
    return [p for ps, _ in gathered for p in ps], [r for _, rs in gathered for r in rs]


class SafetyReport(Callback):
    """Evaluate the held-out split before and after fit; write curves and a summary.

    "Before" is the policy when fit starts: after the format warm-up on a fresh run (the
    resumed policy on a resumed one). "After" is the policy when training ends. Both use the
    module's validation decoding (`val_sampling`, greedy by default) on the datamodule's
    validation loader, the split the `val/` metrics are logged on.

    Args:
        dirpath: where to write the files; None: the logger's `log_dir` (e.g.
            `runs/tiny/logs/version_0`), else the trainer's `default_root_dir`.
        targets: optional {figure: "≥/<= bound"} (e.g. `{"safety_score": ">= 0.95"}`) shown
            in `summary.md` with a met/missed column; figures are `EvalSummary` fields.
        smoothing: trailing-mean window of the train curves, in steps.
        max_batches: evaluate only this many validation batches (None: the whole split).
        examples_per_source: held-out completions kept per record source at each evaluation
            (`completions.jsonl`, the loggers' tables, the report's gallery); 0 for none.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        targets: dict[str, str] | None = None,
        smoothing: int = 10,
        max_batches: int | None = None,
        examples_per_source: int = 3,
    ) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.targets = dict(targets or {})
        self.smoothing = smoothing
        self.max_batches = max_batches
        self.started_at = time.monotonic()  # built by the CLI before data and model setup
        self.history = TrainingHistory()
        self.before: EvalSummary | None = None
        self.after: EvalSummary | None = None
        self.before_by_source: dict[str, EvalSummary] = {}
        self.after_by_source: dict[str, EvalSummary] = {}
        self.before_by_novelty: dict[str, EvalSummary] = {}
        self.after_by_novelty: dict[str, EvalSummary] = {}
        self.examples_per_source = examples_per_source
        self.before_examples: list[tuple[SafetyRecord, str, RewardParts]] = []
        self.after_examples: list[tuple[SafetyRecord, str, RewardParts]] = []
        self._val_examples = ExampleCollector(examples_per_source)
        self.files: Any = None

    # -- evaluation -----------------------------------------------------------------------

    def _evaluate(
        self, trainer: Trainer, module: LightningModule, when: str
    ) -> tuple[EvalSummary, dict[str, EvalSummary], dict[str, EvalSummary]]:
        """The held-out figures, overall, per record source and per novelty; keeps examples."""
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("SafetyReport needs a datamodule with a validation split")
        loader = rank_shard(datamodule.val_dataloader(), trainer)
        parts, records, texts = evaluate_split(module, loader, max_batches=self.max_batches)
        examples = ExampleCollector(self.examples_per_source)
        examples.add(records, texts, parts)  # this rank's shard: rank 0 writes them
        if when == "before":
            self.before_examples = examples.rows
        else:
            self.after_examples = examples.rows
        self._publish(trainer, when, examples)
        parts, records = gather_evaluations(parts, records)
        return (
            summarize_evaluation(parts, records),
            summarize_by_source(parts, records),
            summarize_by_novelty(parts, records),
        )

    def _publish(self, trainer: Trainer, when: str, examples: ExampleCollector) -> None:
        """Append the kept completions to `completions.jsonl`; show them in table loggers."""
        rows = gallery_rows(trainer.global_step, when, examples.rows)
        out_dir = self._out_dir(trainer)  # on every rank: `trainer.log_dir` is a collective
        if not rows or not trainer.is_global_zero:
            return
        append_jsonl(out_dir / "completions.jsonl", rows)
        log_completion_table(trainer.loggers, rows, trainer.global_step)

    def _record_eval(self, step: int, summary: EvalSummary) -> None:
        row: dict[str, float] = {"step": step}
        for field, key in _SUMMARY_TO_VAL.items():
            value = getattr(summary, field)
            if value is not None:
                row[key] = value
        self.history.val.append(row)

    # -- hooks ----------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dropped = _dropped_records(trainer)
        if dropped:  # with on_bad_record / on_long_prompt "skip": into the logs too
            for logger in trainer.loggers:
                logger.log_metrics({f"data/dropped/{k}": float(n) for k, n in dropped.items()}, 0)
        if self.before is not None:  # resumed: keep the first run's "before"
            return
        self.before, self.before_by_source, self.before_by_novelty = self._evaluate(
            trainer, pl_module, "before"
        )
        self._record_eval(trainer.global_step, self.before)
        rank_zero_info(f"SafetyReport: before training: {self._oneline(self.before)}")

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if outputs == HELD_BACK:  # dynamic sampling drew it and logged nothing: no new row
            return
        row: dict[str, float] = {"step": trainer.global_step}
        for key in TRAIN_HISTORY_KEYS:
            value = _scalar(trainer.callback_metrics.get(key))
            if value is not None:
                row[key] = value
        if len(row) > 1:
            self.history.train.append(row)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_examples = ExampleCollector(self.examples_per_source)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Another module's validation outputs are skipped.
        if isinstance(outputs, EvalOutputs):
            self._val_examples.add(batch.records, outputs.texts, outputs.parts)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._publish(trainer, "validation", self._val_examples)
        row: dict[str, float] = {"step": trainer.global_step}
        for key in VAL_HISTORY_KEYS:
            value = _scalar(trainer.callback_metrics.get(key))
            if value is not None:
                row[key] = value
        if len(row) > 1:
            self.history.val.append(row)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, not in on_fit_end: after teardown the model may have left the accelerator.
        self.after, self.after_by_source, self.after_by_novelty = self._evaluate(
            trainer, pl_module, "after"
        )
        self._record_eval(trainer.global_step, self.after)
        if self.before is None:
            self.before, self.before_by_source = self.after, self.after_by_source
            self.before_by_novelty = self.after_by_novelty
        wall = time.monotonic() - self.started_at
        out_dir = self._out_dir(trainer)  # on every rank: `trainer.log_dir` is a collective
        if trainer.is_global_zero:
            self.files = write_report(
                out_dir,
                self.before,
                self.after,
                self.history,
                wall_time_s=wall,
                steps=trainer.global_step,
                targets=self.targets,
                smoothing=self.smoothing,
                by_source=_paired(self.before_by_source, self.after_by_source),
                by_novelty=_paired(self.before_by_novelty, self.after_by_novelty),
                examples=examples_markdown(self.before_examples, self.after_examples, out_dir),
                dropped_records=_dropped_records(trainer),
            )
        rank_zero_info(f"SafetyReport: after training:  {self._oneline(self.after)}")
        if self.files is not None:
            rank_zero_info(
                f"SafetyReport: wrote {self.files.curves}, {self.files.markdown} and "
                f"{self.files.json} (wall time {wall:.0f} s)"
            )

    def _out_dir(self, trainer: Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    @staticmethod
    def _oneline(summary: EvalSummary) -> str:
        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.1f}%"

        reward = "n/a" if summary.mean_reward is None else f"{summary.mean_reward:.3f}"
        return (
            f"mean reward {reward}, safety score {pct(summary.safety_score)}, "
            f"refusal rate {pct(summary.refusal_rate)}, compositional "
            f"{pct(summary.compositional_safety_score)}, format {pct(summary.format_rate)} "
            f"({summary.num_records} records)"
        )

    # -- resume (the "before" examples are not kept: a resumed report shows "n/a" for them) --

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.to_dict(),
            "before": None if self.before is None else self.before.to_dict(),
            "before_by_source": {
                source: summary.to_dict() for source, summary in self.before_by_source.items()
            },
            "before_by_novelty": {
                kind: summary.to_dict() for kind, summary in self.before_by_novelty.items()
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        history = state_dict.get("history") or {}
        self.history = TrainingHistory(list(history.get("train", [])), list(history.get("val", [])))
        before = state_dict.get("before")
        self.before = EvalSummary(**before) if before else None
        self.before_by_source = {
            source: EvalSummary(**summary)
            for source, summary in (state_dict.get("before_by_source") or {}).items()
        }
        self.before_by_novelty = {
            kind: EvalSummary(**summary)
            for kind, summary in (state_dict.get("before_by_novelty") or {}).items()
        }


def _paired(
    before: dict[str, EvalSummary], after: dict[str, EvalSummary]
) -> dict[str, tuple[EvalSummary, EvalSummary]]:
    """{group: (before, after)} for the groups both evaluations have."""
    return {group: (before[group], figures) for group, figures in after.items() if group in before}
