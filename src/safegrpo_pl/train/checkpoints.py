"""What a SafeGRPO checkpoint must match before a run resumes from it, and the errors that say
what does not.

A checkpoint that does not fit the run must stop it with a message naming the file and the
mismatch, never a stack trace from deep inside `torch.load` or `load_state_dict`, and never a
silent partial load: with LoRA the module loads with `strict_loading=False` (the checkpoint
holds only the adapters), which would otherwise let a missing or unexpected key pass.

The checkpoint carries a `safegrpo_policy` record (`policy_signature`): the model type, every
parameter's shape, the LoRA settings, and the folder the policy started from (the warm-up's
result, whose name holds its cache key). `check_policy` compares it with the run's, and
`check_state_keys` compares the saved tensors with the ones the policy expects.
"""

from __future__ import annotations

import logging
import os
import random
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from safegrpo_pl.core.files import atomic_file

log = logging.getLogger(__name__)


def collect_rng_states(generator: torch.Generator | None = None) -> dict[str, Any]:
    """torch, Python, numpy (and CUDA) generator states, plus `generator`'s if given; only
    tensors and builtins, so that `torch.load(weights_only=True)` accepts them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        states["sampling"] = generator.get_state()
    return states


def restore_rng_states(states: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Put back what `collect_rng_states` saved (and `generator`'s state, if it was saved)."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None and "sampling" in states:
        generator.set_state(states["sampling"])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_from_ranks(mine: Any) -> list[Any]:
    """Every rank's `mine`, in rank order (a collective under DDP: every process must call it,
    as Lightning does with `on_save_checkpoint`)."""
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return [mine]
    ranks: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, mine)
    return ranks


def gather_rng_states(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every rank's `collect_rng_states`, in rank order (a collective, `gather_from_ranks`)."""
    return {"ranks": gather_from_ranks(collect_rng_states(generator))}


def restore_rank_state(saved: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore this rank's state from what `gather_rng_states` saved.

    A checkpoint written by a different number of processes cannot be continued exactly;
    each rank then takes the state of rank `rank % saved ranks`, and a warning says so.
    Checkpoints from before per-rank states (one dict) are read as rank 0's.
    """
    ranks = saved.get("ranks", [saved])
    rank = torch.distributed.get_rank() if _distributed() else 0
    world = torch.distributed.get_world_size() if _distributed() else 1
    if len(ranks) != world:
        log.warning(
            "the checkpoint holds the random state of %d process(es), this run has %d: the "
            "resumed run will not sample what the interrupted one would have",
            len(ranks),
            world,
        )
    restore_rng_states(ranks[rank % len(ranks)], generator)


SIGNATURE_KEY = "safegrpo_policy"
RNG_KEY = "rng_states"
GUARD_KEY = "nonfinite_guard"


class CheckpointError(ValueError):
    """A checkpoint this run cannot resume from; the message names the file and the problem."""


def check_file(path: str | Path) -> None:
    """Raise `CheckpointError` when `path` is not a readable, intact checkpoint archive.

    `torch.save` writes a zip with a CRC per record; `torch.load` does not check them, so a
    flipped byte in a weight would load silently. This reads the whole file once.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({error}): the file is truncated or is not a "
            "checkpoint; resume from an earlier one"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its record {bad!r} fails its checksum; resume from "
            "an earlier checkpoint"
        )


def _base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def policy_signature(model: Any, lora: Any, policy_path: str | None) -> dict[str, Any]:
    """What identifies the trained policy: plain data, saved in every checkpoint."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    return {
        "model_type": getattr(config, "model_type", type(base).__name__),
        "shapes": {name: list(p.shape) for name, p in model.named_parameters()},
        "lora": None if lora is None else asdict(lora),
        "start": None if policy_path is None else Path(policy_path).name,
    }


def _lora_text(lora: dict[str, Any] | None) -> str:
    if lora is None:
        return "no LoRA (all weights trained)"
    return ", ".join(f"{k}={v}" for k, v in lora.items())


def check_policy(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Raise `CheckpointError` when the checkpoint's policy is not this run's."""
    if saved["model_type"] != current["model_type"]:
        raise CheckpointError(
            f"checkpoint {path} holds a {saved['model_type']} policy; this run loads a "
            f"{current['model_type']}: set model.policy.name_or_path to the checkpoint's model"
        )
    if saved["lora"] != current["lora"]:
        raise CheckpointError(
            f"checkpoint {path} was trained with LoRA settings [{_lora_text(saved['lora'])}]; "
            f"this run has [{_lora_text(current['lora'])}]: set model.policy.lora to the "
            "checkpoint's"
        )
    old, new = saved["shapes"], current["shapes"]
    if old != new:
        differing = sorted(n for n in old.keys() & new.keys() if old[n] != new[n])
        detail = (
            f"{differing[0]} is {old[differing[0]]} there and {new[differing[0]]} here"
            if differing
            else f"{len(old.keys() - new.keys())} of its tensors do not exist here and "
            f"{len(new.keys() - old.keys())} of this run's are not in it"
        )
        raise CheckpointError(
            f"checkpoint {path} holds another {saved['model_type']} architecture ({detail}): "
            "set model.policy.name_or_path to the checkpoint's model"
        )
    if saved["start"] != current["start"]:
        raise CheckpointError(
            f"checkpoint {path} continued from the policy in {saved['start']!r}; this run starts "
            f"from {current['start']!r} (another model folder or format warm-up: the data or "
            "model.warmup settings differ); use the checkpoint's settings"
        )


def check_state_keys(saved: dict[str, Any], expected: dict[str, Any], path: str) -> None:
    """Raise `CheckpointError` unless `saved` has exactly the tensors (names and shapes) of
    `expected`: no load may skip a weight silently."""
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the policy's weights: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); it "
            "was written for another model or LoRA setting"
        )
    for name, tensor in saved.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, the policy's is "
                f"{tuple(expected[name].shape)}; it was written for another model or LoRA setting"
            )


def policy_tensors(module: Any) -> dict[str, Any]:
    """What a checkpoint holds of `module`'s policy: with LoRA only the trainable tensors (the
    frozen base is re-loaded from its folder), else the whole state."""
    if module.settings.lora is None:
        return module.state_dict()
    return {f"policy.{n}": p for n, p in module.policy.named_parameters() if p.requires_grad}


def _where(module: Any) -> str:
    trainer = module._trainer
    return str(trainer.ckpt_path) if trainer is not None and trainer.ckpt_path else "given"


def write_extras(module: Any, checkpoint: dict[str, Any]) -> None:
    """`SafeGRPOModule.on_save_checkpoint`: every process's random state (with the module's
    `sampling_generator`, if it has one), the policy's signature, the non-finite guard's
    counts; with LoRA the weights are cut down to the adapters."""
    checkpoint[RNG_KEY] = gather_rng_states(getattr(module, "sampling_generator", None))
    checkpoint[SIGNATURE_KEY] = policy_signature(
        module.policy, module.settings.lora, module.policy_path
    )
    checkpoint[GUARD_KEY] = module.guard.state_dict()
    if module.settings.lora is not None:
        kept = policy_tensors(module).keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in kept}


def read_extras(module: Any, checkpoint: dict[str, Any]) -> None:
    """`SafeGRPOModule.on_load_checkpoint`: check the policy and every key ourselves (with
    LoRA, Lightning loads non-strictly), then restore the guard's counts and the random
    state."""
    path = _where(module)
    if SIGNATURE_KEY in checkpoint:
        current = policy_signature(module.policy, module.settings.lora, module.policy_path)
        check_policy(checkpoint[SIGNATURE_KEY], current, path)
    if "state_dict" in checkpoint:  # a sharded (FSDP2) checkpoint's weights are loaded, in
        # place and strictly, by the strategy itself: the hook then gets no state_dict
        check_state_keys(checkpoint["state_dict"], policy_tensors(module), path)
    module.guard.load_state_dict(checkpoint.get(GUARD_KEY, {}))
    if RNG_KEY in checkpoint:
        restore_rank_state(checkpoint[RNG_KEY], getattr(module, "sampling_generator", None))


def _plain(value: Any) -> Any:
    """A config value (dataclass, jsonargparse Namespace, dict) as plain dicts and lists."""
    if hasattr(value, "__dataclass_fields__"):
        value = asdict(value)
    elif hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class CheckpointFacts:
    """What the command line reads off a checkpoint before Lightning does.

    Attributes:
        global_step: optimiser steps done when it was written.
        run_folder: the run folder it was written by (a callback's `run_folder` state), or
            None when it does not say.
    """

    global_step: int
    run_folder: str | None


def check_cli_checkpoint(path: str | Path, model_config: Any) -> CheckpointFacts:
    """What the command line checks before Lightning reads `path`: an intact file, a Lightning
    checkpoint, and the configured policy (model path and LoRA settings): Lightning would
    otherwise replace the configured model with the checkpoint's without a word."""
    import torch

    check_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # any unreadable content is the same problem for the user
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded ({first}): it is not a SafeGRPO checkpoint or "
            "it is damaged"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} holds no model weights (no 'state_dict')")
    states = checkpoint.get("callbacks") or {}
    folders = [v.get("run_folder") for v in states.values() if isinstance(v, dict)]
    facts = CheckpointFacts(
        int(checkpoint.get("global_step", 0)), next((f for f in folders if f), None)
    )
    saved = (checkpoint.get("hyper_parameters") or {}).get("policy")
    configured = _plain(model_config).get("policy") if model_config else None
    if not saved or not configured:
        return facts
    for field in ("name_or_path", "lora"):
        if _plain(saved.get(field)) != configured.get(field):
            raise CheckpointError(
                f"checkpoint {path} was trained with model.policy.{field}="
                f"{saved.get(field)!r}; this run sets {configured.get(field)!r}: resume with "
                "the checkpoint's settings, or start a new run without --ckpt_path"
            )
    return facts


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota); the earlier ones are intact."""

    def __str__(self) -> str:
        return str(self.args[0])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made whole-or-nothing on a local disk.

    The checkpoint goes to a hidden temporary file beside its target, is flushed to the disk,
    and only then renamed over the target: a process killed while writing, or a full disk,
    leaves the previous checkpoint of that name as it was. Remote paths go through Lightning's
    own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        try:
            with atomic_file(target, fsync=True) as tmp, open(tmp, "wb") as file:
                torch.save(checkpoint, file)
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            failure = CheckpointWriteError(
                f"cannot write checkpoint {target}: {reason}. Free space (or set "
                "--trainer.default_root_dir to a larger disk) and resume with --ckpt_path "
                "last; the checkpoints written before are intact"
            )
            failure.errno, failure.filename = error.errno, str(target)
            raise failure from None
        return None
