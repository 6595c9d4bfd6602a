"""Precision that learns: float32 trainable weights beside a half-precision frozen base.

Why: at GRPO's learning rates (1e-6) an AdamW update moves a weight by about 1e-6, far below
bf16's resolution (8 significant bits: the step between neighbours near 0.1 is ~5e-4). With
every weight in bf16 (Lightning's `bf16-true`) most LoRA updates round to nothing: the
adapters barely move and the run does not learn. So the weights the optimiser updates, and
hence its state, are kept in `model.policy.trainable_dtype` (float32 by default) while the
frozen base stays in `model.policy.dtype`; with `trainer.precision: bf16-mixed` (or `32-true`)
Lightning leaves these dtypes alone. peft computes each LoRA branch in its weights' dtype and
adds it back in the base's.

The frozen reference copy (full fine-tuning with a KL term) is placed like the policy's frozen
weights: same device, and the dtype the base was loaded in, never the float32 of the trainable
copy nor a dtype the precision plugin left behind (`place_reference`). With LoRA the reference
is the base itself with adapters off, so it shares the base's dtype and device by construction.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def dtype_named(name: str, setting: str = "model.policy.dtype") -> torch.dtype:
    """The torch dtype called `name`, or a clear error naming `setting`."""
    if name not in DTYPES:
        raise ValueError(f"{setting} is {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def cast_trainable(model: Any, dtype: torch.dtype) -> int:
    """Cast every trainable floating-point parameter of `model` to `dtype` in place.

    Returns:
        How many parameters were cast.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def check_trainable_dtype(model: Any, expected: torch.dtype | None) -> None:
    """Raise if a trainable weight is not in `expected` (a precision plugin recast it)."""
    if expected is None:
        return
    found = {p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()}
    wrong = found - {expected}
    if wrong:
        raise ValueError(
            f"the trainable weights are {sorted(map(str, wrong))} but model.policy."
            f"trainable_dtype is {str(expected).removeprefix('torch.')}: "
            "trainer.precision bf16-true / 16-true casts every weight, the optimiser state "
            "with it, and at small learning rates most updates then round away. Use "
            "trainer.precision: bf16-mixed (or 32-true) with model.policy.dtype: bfloat16, or "
            "set model.policy.trainable_dtype: null to accept it"
        )


def frozen_weight_dtype(policy: Any, loaded: torch.dtype) -> torch.dtype:
    """The dtype of the policy's frozen weights: that of its frozen floating parameters when it
    has any (LoRA: the base), else the dtype the base was loaded in (`loaded`), unless every
    weight now has one lower-precision dtype (a precision plugin cast the whole model)."""
    frozen = [p for p in policy.parameters() if not p.requires_grad and p.is_floating_point()]
    if frozen:
        return frozen[0].dtype
    found = {p.dtype for p in policy.parameters() if p.is_floating_point()}
    if len(found) == 1:
        (only,) = found
        if torch.finfo(only).bits < torch.finfo(loaded).bits:
            return only
    return loaded


def place_reference(reference: Any, policy: Any, loaded: torch.dtype) -> Any:
    """Move `reference` to the device and frozen-weight dtype of `policy` (see module doc)."""
    first = next(policy.parameters())
    return reference.to(device=first.device, dtype=frozen_weight_dtype(policy, loaded))
