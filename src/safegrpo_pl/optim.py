"""The optimiser and learning-rate schedule of a GRPO run (docs/method.md section 4: AdamW,
constant learning rate, no warm-up; a linear warm-up and a decay are options for short runs)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

LR_DECAYS = ("constant", "linear", "cosine")


def lr_multiplier(step: int, total: int | None, kind: str, warmup_steps: int = 0) -> float:
    """The learning-rate factor for optimiser step `step` (from 0) of `total`.

    First `warmup_steps` steps rising along a line to 1 (step `i` at `(i + 1) / (warmup + 1)`),
    then 1 for "constant", 1 -> 0 along a line ("linear") or half a cosine ("cosine") over the
    remaining steps (a run shorter than its warm-up never reaches the full rate: a short check
    run of a config keeps the config's schedule). The warm-up keeps AdamW's first steps, which
    move every weight by about the full learning rate whatever the gradient's size, from
    undoing what a model already writes; the decay lets a short run on a random-weight model
    (the demo) settle instead of ending on a large, noisy update.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    assert total is not None
    span = max(total - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class OptimizerPlan:
    """AdamW's settings and the decay; `build` returns what `configure_optimizers` returns."""

    lr: float
    weight_decay: float
    lr_decay: str
    max_steps: int | None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay is {self.lr_decay!r}; choose one of {list(LR_DECAYS)}")
        if self.warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps is {self.warmup_steps}; expected >= 0")

    def build(self, params: Iterable[torch.nn.Parameter]) -> Any:
        """AdamW over the trainable `params`, with a per-step LambdaLR unless constant."""
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters: check lora.target_modules")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_decay == "constant" and self.warmup_steps == 0:
            return optimizer
        total, kind, warmup = self.max_steps, self.lr_decay, self.warmup_steps
        if kind != "constant" and (total is None or total < 1):
            raise ValueError(
                f"lr_decay={kind!r} decays to 0 at trainer.max_steps, which is not set "
                "(set --trainer.max_steps, or use lr_decay: constant)"
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, total, kind, warmup)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule}}
