"""What `model.recompute_head` costs in step time, both settings in one run (docs/scale.md).

    PYTHONPATH=src python scripts/head_cost.py [--steps 3] [--reps 7] [--json out.json]

Cases:
- demo: the demo's model and step (configs/tiny.yaml: 32 prompts x G 4, 64 new tokens). Its
  vocabulary fits one LM-head chunk, so `recompute_head` recomputes nothing there;
- the same with the head cut into chunks of 2,048 tokens (4 chunks over the 8,192 scored
  tokens): what recomputing costs where it does happen, on this model;
- wide vocab: the tiny Qwen3-VL with its LM head and embeddings widened to Qwen's 151,669
  tokens (4 prompts x G 4, 64 new tokens: 1,024 scored tokens, 3 chunks of 442).

Each case runs `fit` for `--steps` steps (recompute off; the first step dropped as warm-up) for
the step time, then times the training pass (log-probs with grad, then backward: what a step
repeats per micro-batch) on one sampled rollout batch, the two settings alternating `--reps`
times. Times are this process's CPU seconds on one thread (`time.process_time`), which the
load of a shared machine moves far less than wall time. Every completion runs to
max_new_tokens (end-of-sequence suppressed). The step's ratio is (step + extra) / step, where
extra is the difference of the two training-pass medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, Trainer, seed_everything

from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.demo.dataset import DemoConfig
from safegrpo_pl.policy.model import PolicySettings
from safegrpo_pl.policy.tiny_models import resolve_model_path
from safegrpo_pl.rollout import logprobs
from safegrpo_pl.rollout.sampling import SamplingSettings
from safegrpo_pl.train.module import SafeGRPOModule

QWEN_VOCAB = 151_669
DEMO_MODEL = "tiny:qwen2_5_vl?hidden_size=128&num_layers=4"


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    batch_size: int
    group_size: int
    head_chunks: tuple[int | None, ...] = (None,)  # tokens per LM-head chunk; None: the library's


class StepTimes(Callback):
    """Each step's CPU seconds (this process, one thread), every completion made to run to the
    length limit."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        pl_module.runner.decode_ids = pl_module.runner.decode_ids.never_ending()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.process_time() - self.start)


def wide_vocab_model(out: Path) -> str:
    """The default tiny Qwen3-VL with its vocabulary widened to Qwen's (new rows random)."""
    from transformers import AutoModelForImageTextToText

    shutil.copytree(resolve_model_path("tiny:qwen3_vl"), out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    torch.manual_seed(0)
    model.resize_token_embeddings(QWEN_VOCAB, mean_resizing=False)
    model.save_pretrained(out)
    return str(out)


def fit_steps(case: Case, steps: int) -> tuple[SafeGRPOModule, Any, list[float]]:
    """`steps` fit steps of `case` (recompute off): the module, its data and the CPU seconds
    of each step but the first."""
    seed_everything(0, verbose=False)
    module = SafeGRPOModule(
        policy=PolicySettings(name_or_path=case.model),
        group_size=case.group_size,
        kl_coef=0.3,
        sampling=SamplingSettings(max_new_tokens=64),
        recompute_head=False,
    )
    data = SafeTagDataModule(
        dataset="demo",
        processor=case.model,
        guide=None,
        batch_size=case.batch_size,
        demo=DemoConfig(num_train=case.batch_size * steps, num_val=2, num_test=2),
    )
    times = StepTimes()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[times],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    return module, data, times.seconds[1:]


def training_pass_seconds(
    module: SafeGRPOModule, data: Any, reps: int, chunk_tokens: int | None
) -> dict[bool, list[float]]:
    """Seconds of log-probs with grad + backward on one rollout batch, per setting."""
    runner, model = module.runner, module.policy
    batch = next(iter(data.train_dataloader()))
    rollout = runner.sample(batch, module.group_size, module.sampling)
    ids, mask = rollout.completion_ids, rollout.completion_mask
    saved = logprobs.HEAD_CHUNK_ELEMENTS
    if chunk_tokens is not None:
        logprobs.HEAD_CHUNK_ELEMENTS = chunk_tokens * model.get_output_embeddings().weight.shape[0]
    seconds: dict[bool, list[float]] = {False: [], True: []}
    model.train()
    try:
        for _ in range(reps):
            for setting in (False, True):
                start = time.process_time()
                logp = runner.logprobs(model, batch, ids, mask, 1.0, recompute_head=setting)
                logp.sum().backward()
                seconds[setting].append(time.process_time() - start)
                model.zero_grad(set_to_none=True)
    finally:
        logprobs.HEAD_CHUNK_ELEMENTS = saved
    return seconds


def measure(case: Case, steps: int, reps: int) -> list[dict[str, Any]]:
    """Median step and training-pass seconds, and what recomputing adds to each, per chunk."""
    module, data, rows = fit_steps(case, steps)
    step = statistics.median(rows)
    out = []
    for chunk in case.head_chunks:
        passes = training_pass_seconds(module, data, reps, chunk)
        off, on = statistics.median(passes[False]), statistics.median(passes[True])
        out.append(
            {
                "case": case.name if chunk is None else f"{case.name}, {chunk}-token chunks",
                "step_s": step,
                "training_pass_off_s": off,
                "training_pass_on_s": on,
                "training_pass_ratio": on / off,
                "step_ratio": (step + on - off) / step,
                "steps": len(rows),
                "reps": reps,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="fit steps for the step time")
    parser.add_argument("--reps", type=int, default=7, help="training passes per setting")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--cases", default="demo,wide-vocab")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # steadier on a shared machine
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            "demo": lambda: Case("demo", DEMO_MODEL, 32, 4, (None, 2048)),
            "wide-vocab": lambda: Case("wide vocab", wide_vocab_model(Path(tmp) / "w"), 4, 4),
        }
        names = args.cases.split(",")
        rows = [row for name in names for row in measure(cases[name](), args.steps, args.reps)]
    print(
        f"{'case':<24} {'step s':>7} {'pass off s':>11} {'pass on s':>10} {'pass':>6} {'step':>6}"
    )
    for r in rows:
        print(
            f"{r['case']:<24} {r['step_s']:>7.3f} {r['training_pass_off_s']:>11.3f} "
            f"{r['training_pass_on_s']:>10.3f} {r['training_pass_ratio']:>6.3f} "
            f"{r['step_ratio']:>6.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
