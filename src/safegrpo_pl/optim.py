"""The optimiser and learning-rate schedule of a GRPO run (docs/method.md section 4: AdamW,
constant learning rate, no warm-up; a decay is an option for short runs)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

LR_DECAYS = ("constant", "linear", "cosine")


def lr_multiplier(step: int, total: int, kind: str) -> float:
    """The learning-rate factor after `step` of `total` optimiser steps: 1 for "constant",
    1 -> 0 along a line ("linear") or half a cosine ("cosine"). A decay lets a short run on a
    random-weight model (the demo) settle instead of ending on a large, noisy update."""
    if kind == "constant":
        return 1.0
    progress = min(max(step / total, 0.0), 1.0)
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

    def __post_init__(self) -> None:
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay is {self.lr_decay!r}; choose one of {list(LR_DECAYS)}")

    def build(self, params: Iterable[torch.nn.Parameter]) -> Any:
        """AdamW over the trainable `params`, with a per-step LambdaLR unless constant."""
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters: check lora.target_modules")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_decay == "constant":
            return optimizer
        total, kind = self.max_steps, self.lr_decay
        if total is None or total < 1:
            raise ValueError(
                f"lr_decay={kind!r} decays to 0 at trainer.max_steps, which is not set "
                "(set --trainer.max_steps, or use lr_decay: constant)"
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, total, kind)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule}}
