"""FSDP2 for full fine-tuning: shard the policy (and its frozen reference) over the ranks.

Which strategy and why: Lightning's `ModelParallelStrategy`, with torch's `fully_shard` (FSDP2)
applied in `SafeGRPOModule.configure_model` (`shard_policy`). FSDP2 shards each parameter on
its own as a DTensor, so frozen and trainable weights mix freely (LoRA, a frozen reference),
torch's `clip_grad_norm_` works on the sharded gradients (Lightning's FSDP1 precision plugin
refuses to clip by norm), the state dict keeps the model's own parameter names, and it runs on
CPU with gloo, where the tests run it (the strategy passes no CUDA device there). Lightning's
`FSDPStrategy` is FSDP1: flat parameters behind a wrapping policy, and none of the above.

How the model is cut: every module class the model itself declares unsplittable
(`_no_split_modules`: decoder layers, vision blocks) is one unit, then the vision tower (patch
embedding, merger), the body (embeddings, final norm) and the LM head are units of their own. The step code never calls
the top-level `forward` (it runs the body and the head apart, see `safegrpo_pl.rollout.logprobs`), so
the body and the head are the roots whose hooks gather and reduce their weights.

Sampling gathers all weights once for the whole decode (`gathered_weights`): thousands of
decode steps then issue no all-gather at all; the policy's full bf16 weights (16 GB for an 8B
model) live on each GPU only while it decodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor


def _fsdp() -> Any:
    from torch.distributed import fsdp

    return fsdp


def fsdp_modules(model: Any) -> list[Any]:
    """The FSDP2 units inside `model` (empty when it is not sharded)."""
    if model is None or not hasattr(model, "modules"):
        return []
    kind = _fsdp().FSDPModule
    return [m for m in model.modules() if isinstance(m, kind)]


def is_sharded(model: Any) -> bool:
    """Whether `model` holds FSDP2-sharded parameters."""
    return bool(fsdp_modules(model))


def _no_split_classes(base: Any) -> set[str]:
    names = set(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(
            f"{type(base).__name__} declares no `_no_split_modules` (its decoder layer "
            "classes), so there is nothing to shard per layer; use strategy ddp for it"
        )
    return names


def shard_policy(model: Any, mesh: Any, compute_dtype: torch.dtype | None = None) -> int:
    """`fully_shard` `model` per layer, then its body and LM head; returns the number of units.

    Args:
        model: a transformers model, or a peft model wrapping one.
        mesh: the 1-D data-parallel device mesh (`ModelParallelStrategy`'s, "data_parallel").
        compute_dtype: gather the weights in this dtype for forward and backward (bf16) while
            the shards, their gradients' reduction and AdamW stay in the loaded dtype (fp32):
            an update of lr 1e-6 is below bf16's resolution, so master weights must not be bf16.
            None: compute in the loaded dtype.

    Raises:
        ValueError: the input and output embeddings are one tensor (tied; the body and the
            head could not be separate units), or a parameter was left outside every unit.
    """
    from safegrpo_pl.rollout.prefill import model_body, unwrap_model

    fully_shard = _fsdp().fully_shard
    base = unwrap_model(model)
    body, head = model_body(base), base.get_output_embeddings()
    embed = base.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        raise ValueError(
            f"{type(base).__name__} ties its LM head to its input embeddings; FSDP here needs "
            "them apart: load it with tie_word_embeddings=False, or use strategy ddp"
        )
    layer_classes = _no_split_classes(base)
    units = [m for m in base.modules() if type(m).__name__ in layer_classes]
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": True}
    if compute_dtype is not None:
        options["mp_policy"] = _fsdp().MixedPrecisionPolicy(
            param_dtype=compute_dtype, reduce_dtype=torch.float32
        )
    # The vision tower is a unit of its own: gradient checkpointing's full-sequence path
    # encodes images through `body.get_image_features`, not the body's forward
    # (`safegrpo_pl.rollout.logprobs`), and only the tower's own forward hook gathers its
    # weights there.
    tower = getattr(body, "visual", None)
    units += [tower] if isinstance(tower, torch.nn.Module) else []
    for unit in [*units, body, head]:
        fully_shard(unit, **options)
    _check_all_sharded(model)
    return len(units) + 2


def _check_all_sharded(model: Any) -> None:
    from torch.distributed.tensor import DTensor

    left = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if left:
        raise ValueError(
            f"{len(left)} parameters are outside every FSDP unit (first: {left[:3]}); their "
            "gradients would not be averaged over ranks. Shard the module that holds them"
        )


@contextlib.contextmanager
def gathered_weights(model: Any) -> Iterator[None]:
    """Hold `model`'s full weights on every rank inside the block (a no-op when unsharded).

    Every rank must enter it together (all-gathers). The weights are sharded again on exit.
    """
    units = fsdp_modules(model)
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def clip_sharded_gradients(params: Iterable[torch.nn.Parameter], max_norm: float) -> Tensor:
    """Clip sharded gradients to `max_norm` in place; returns the global norm before clipping.

    The norm is reduced over the shards of every rank (a collective: call it on all ranks).
    """
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    full = getattr(norm, "full_tensor", None)
    return (full() if full is not None else norm).detach()


def full_state_dict(model: Any) -> dict[str, Tensor]:
    """`model`'s whole state dict on rank 0 (on the CPU), an empty dict on the other ranks.

    A collective for a sharded model: every rank calls it. Unsharded, the plain state dict.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def shard_models(
    policy: Any, references: list[Any], strategy_mesh: Any, compute_dtype: str | None
) -> None:
    """Shard the policy and its frozen references over the strategy's data-parallel ranks.

    The references are cast to `compute_dtype` first: frozen, they need no fp32 master copy.
    """
    from safegrpo_pl.policy.model import DTYPES

    mesh = data_parallel_mesh(strategy_mesh)
    dtype = DTYPES[compute_dtype] if compute_dtype else None
    for reference in references:
        if dtype is not None:
            reference.to(dtype)
    for model in (policy, *references):
        shard_policy(model, mesh, dtype)


def data_parallel_mesh(strategy_mesh: Any) -> Any:
    """The mesh to shard over: `ModelParallelStrategy`'s data-parallel dimension.

    Raises:
        ValueError: the strategy splits tensors too (`tensor_parallel_size` > 1), which this
            project does not implement.
    """
    names = getattr(strategy_mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and strategy_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"ModelParallelStrategy has tensor_parallel_size "
            f"{strategy_mesh['tensor_parallel'].size()}; this project shards with FSDP only: "
            "set trainer.strategy.init_args.tensor_parallel_size: 1 and data_parallel_size to "
            "num_nodes x devices"
        )
    return strategy_mesh["data_parallel"] if "data_parallel" in names else strategy_mesh
