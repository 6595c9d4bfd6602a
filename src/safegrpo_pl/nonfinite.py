"""Skipping optimiser steps whose loss or gradients are not finite, and stopping when they
keep coming.

One NaN in a gradient, stepped into AdamW, turns every weight it touches into NaN for good; a
skipped step costs one mini-batch. So a step is skipped when the loss, the gradient norm, the
advantages or the log-probs it used hold a NaN or an infinity; the skip is counted
(`train/skipped_steps`) and logged with what was not finite. A run that skips
`max_consecutive_skips` steps in a row is broken (a diverged policy, a bad record), and goes on
only to waste the allocation: it stops with `NonFiniteError` naming the step and the values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# What a step's values are called in the logs and errors, in the order they are reported.
CHECKED = ("loss", "grad_norm", "advantages", "log_probs")


class NonFiniteError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


def nonfinite_names(values: Mapping[str, Tensor | None]) -> list[str]:
    """The names of the tensors in `values` holding a NaN or an infinity (None: not checked)."""
    return [
        name
        for name, value in values.items()
        if value is not None and not bool(torch.isfinite(value.detach()).all())
    ]


def _describe(values: Mapping[str, Tensor | None]) -> str:
    """'loss=nan, grad_norm=inf, advantages: 2 of 8 not finite'."""
    parts = []
    for name, value in values.items():
        if value is None:
            continue
        value = value.detach().float()
        if value.numel() == 1:
            parts.append(f"{name}={value.item():.4g}")
        else:
            bad = int((~torch.isfinite(value)).sum())
            parts.append(f"{name}: {bad} of {value.numel()} not finite")
    return ", ".join(parts)


class NonFiniteGuard:
    """Counts skipped steps; raises after `max_consecutive` skips in a row.

    Args:
        max_consecutive: skipped steps in a row that stop the run (at least 1).
    """

    def __init__(self, max_consecutive: int) -> None:
        if max_consecutive < 1:
            raise ValueError(
                f"max_consecutive_skips is {max_consecutive}; expected at least 1 "
                "(1 stops at the first non-finite step)"
            )
        self.max_consecutive = max_consecutive
        self.skipped = 0  # over the whole run (checkpointed)
        self.consecutive = 0

    def check(
        self,
        step: int,
        values: Mapping[str, Tensor | None],
        logp_ok: bool = True,
        agree: Callable[..., bool] | None = None,
    ) -> bool:
        """Check optimiser step `step`'s values; True when it must be skipped.

        `logp_ok` says whether the log-probs it used were finite; `agree(flag, all=False)`
        (Lightning's `strategy.reduce_boolean_decision`) makes every process skip when one must.
        """
        bad = nonfinite_names(values) + ([] if logp_ok else ["log_probs"])
        skip = bool(agree(bool(bad), all=False)) if agree is not None else bool(bad)
        if skip and not bad:
            bad = ["values on another process"]
        return self.record(step, bad if skip else [], values)

    def record(self, step: int, bad: list[str], values: Mapping[str, Tensor | None]) -> bool:
        """Note the outcome of optimiser step `step`; True when it must be skipped.

        `bad` names the non-finite values (on any process); `values` are this process's.
        """
        if not bad:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        described = _describe(values)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"optimiser step {step}: {self.consecutive} steps in a row had non-finite "
                f"{', '.join(bad)} ({described}); stopping. Lower model.lr, check the data, or "
                "raise model.max_consecutive_skips"
            )
        log.warning(
            "optimiser step %d skipped: non-finite %s (%s); %d skipped so far",
            step,
            ", ".join(bad),
            described,
            self.skipped,
        )
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
