"""`python -m safegrpo_pl plan --config FILE [--gpu_memory 80GB] [--json PATH]`.

Reads the same config(s) as `fit` (several `--config`, `--key value` overrides, OmegaConf
interpolation) with the `fit` command line's own parser, `SafeGRPOCLI` with `run=False`, but
stops before any class is instantiated: the data module would load a processor from the hub,
and the model nothing we need. Parsing through jsonargparse rather than merging YAML by hand
keeps the defaults, types, links and validation of `fit`: a typo in a key fails here as it would
there. The model's dimensions come from its transformers config (hub id, local folder, a
`config.json` given with `--model_config`, or a `tiny:` spec), built on the meta device: no
weights are read or downloaded.

Prints the per-device plan (`safegrpo_pl.plan.memory`), says whether it fits `--gpu_memory` with
`--margin` to spare, and if not, which setting to change and to what, and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from safegrpo_pl.core.errors import OneLineParserErrors
from safegrpo_pl.plan.dims import ModelDims, model_dims
from safegrpo_pl.plan.memory import GIB, MemoryPlan, RunShape, estimate

log = logging.getLogger(__name__)

# Where the strategy's class path or name says it shards parameters across devices.
SHARDING_STRATEGIES = ("fsdp", "model_parallel", "modelparallel", "deepspeed_stage_3")
# The model settings that state float32 trainable weights beside a half-precision base, by
# the names they may take (the first one present wins).


@dataclass(frozen=True)
class Verdict:
    """Whether a plan fits a device, and what to change when it does not.

    Attributes:
        gpu_memory: bytes of one device.
        margin: fraction of `gpu_memory` to leave free (allocator slack, CUDA context).
        fits: peak <= gpu_memory * (1 - margin).
        changes: settings to change (config key -> value) for a plan that fits; empty when it
            fits already or nothing tried fits.
        fixed_peak: the peak in bytes after `changes`.
    """

    gpu_memory: float
    margin: float
    fits: bool
    changes: dict[str, Any]
    fixed_peak: float | None


def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '80', '141 GB' -> bytes (GB and GiB both read as 2**30: GPU sizes)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not match:
        raise ValueError(f"--gpu_memory {text!r}: expected a size like 80GB or 141GiB")
    scale = 2**20 if (match.group(2) or "g").startswith("m") else GIB
    return float(match.group(1)) * scale


class _ParseOnlyCLI:
    """Factory for a `SafeGRPOCLI` that parses and validates but instantiates nothing."""

    @staticmethod
    def config(args: Sequence[str]) -> Any:
        import warnings

        from safegrpo_pl.data.datamodule import SafeTagDataModule
        from safegrpo_pl.run.trainer_cli import SafeGRPOCLI
        from safegrpo_pl.train.module import SafeGRPOModule

        class ParseOnly(SafeGRPOCLI):
            def _set_seed(self) -> None:  # planning draws nothing
                pass

            def instantiate_classes(self) -> None:
                pass

            def after_instantiate_classes(self) -> None:
                pass

        with warnings.catch_warnings():  # `args` beside a `plan` sys.argv is intended here
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = ParseOnly(
                SafeGRPOModule,
                SafeTagDataModule,
                run=False,
                # fit's options: a mistake in them points to `fit --help`
                parser_kwargs={"parser_mode": "omegaconf", "prog": "python -m safegrpo_pl fit"},
                args=list(args),
            )
        return cli.config


def read_config(args: Sequence[str]) -> Any:
    """The parsed `fit` configuration (a jsonargparse Namespace), nothing instantiated."""
    return _ParseOnlyCLI.config(args)


def setting(config: Any, key: str, default: Any = None) -> Any:
    """The value of `key` in the parsed `fit` config, `default` where it is null.

    Every read of the config goes through here, so `plan` can only read keys `fit` accepts.

    Raises:
        KeyError: `fit` has no setting `key`: `plan` would otherwise plan a run `fit` cannot
            start.
    """
    if key not in config:
        raise KeyError(
            f"plan reads the setting {key!r}, which `fit` does not accept (fix the key in "
            "safegrpo_pl/plan/cli.py, or give fit the setting)"
        )
    value = config[key]
    return default if value is None else value


def _world_size(config: Any) -> int:
    devices = setting(config, "trainer.devices", 1)
    nodes = int(setting(config, "trainer.num_nodes", 1))
    if isinstance(devices, list | tuple):
        return len(devices) * nodes
    if isinstance(devices, str):
        devices = (
            1 if devices == "auto" else len(devices.split(",")) if "," in devices else int(devices)
        )
    return max(1, int(devices)) * nodes


def _strategy_name(config: Any) -> str:
    """The strategy's registered name or class path, lower case, dots as underscores."""
    strategy = setting(config, "trainer.strategy", "auto")
    if not isinstance(strategy, str):
        strategy = setting(config, "trainer.strategy.class_path")
    return str(strategy).lower().replace(".", "_")


def _shards(config: Any) -> bool:
    return any(key in _strategy_name(config) for key in SHARDING_STRATEGIES)


def _fsdp_compute_bytes(config: Any) -> int | None:
    """Under `ModelParallelStrategy` (FSDP2), the bytes of `model.fsdp_compute_dtype`, the dtype
    weights are gathered in (None: the loaded dtype); None under any other strategy, where
    `fit` ignores that setting.

    Raises:
        ValueError: the strategy asks for tensor parallelism, which `fit` refuses.
    """
    if "modelparallelstrategy" not in _strategy_name(config):
        return None
    tensor = setting(config, "trainer.strategy.init_args.tensor_parallel_size", "auto")
    per_node = _world_size(config) // int(setting(config, "trainer.num_nodes", 1))
    if (per_node if tensor == "auto" else int(tensor)) > 1:
        raise ValueError(
            f"trainer.strategy.init_args.tensor_parallel_size is {tensor!r}; this project "
            "shards with FSDP only: set it to 1 and data_parallel_size to num_nodes x devices"
        )
    from safegrpo_pl.policy.precision import DTYPES

    name = setting(config, "model.fsdp_compute_dtype")
    return None if name is None else DTYPES[name].itemsize


def _precision(config: Any) -> tuple[str, int]:
    """("uniform" | "mixed", bytes of the frozen weights and activations)."""
    trainer = str(setting(config, "trainer.precision", "32-true"))
    dtype = str(setting(config, "model.policy.dtype", "float32"))
    half = 2 if dtype in ("bfloat16", "bf16", "float16", "fp16") else 4
    master = str(setting(config, "model.policy.trainable_dtype", dtype))
    if trainer.endswith("-true"):  # Lightning casts every parameter to this dtype
        b = 4 if trainer.startswith(("32", "64")) else 2
        return ("mixed" if master in ("float32", "fp32") and b == 2 else "uniform"), b
    if trainer.endswith("-mixed"):  # autocast: half-precision activations, fp32 trainables
        return "mixed", 2
    return ("mixed" if master in ("float32", "fp32") and half == 2 else "uniform"), half


def run_shape(config: Any, *, image_tokens: int = 1024, **overrides: Any) -> RunShape:
    """The `RunShape` of a parsed `fit` config (keyword overrides replace its fields)."""
    batch = int(setting(config, "data.batch_size"))
    mini = setting(config, "model.mini_batch_size")
    steps = int(setting(config, "model.num_iterations", 1)) * (batch // (mini or batch))
    precision, b = _precision(config)
    length = int(setting(config, "data.max_prompt_length"))
    shape = RunShape(
        group_size=int(setting(config, "model.group_size")),
        rollout_batch=batch,
        mini_batch=mini,
        micro_batch=setting(config, "model.micro_batch_size"),
        rollout_chunk=setting(config, "model.rollout_micro_batch_size"),
        prompt_length=length,
        completion_length=int(setting(config, "model.sampling.max_new_tokens")),
        image_tokens=min(image_tokens, length),
        lora=setting(config, "model.policy.lora") is not None,
        load_in_4bit=bool(setting(config, "model.policy.load_in_4bit", False)),
        gradient_checkpointing=bool(setting(config, "model.policy.gradient_checkpointing", False)),
        kl_coef_positive=float(setting(config, "model.kl_coef", 0.0)) > 0,
        old_logprobs=steps > 1,
        precision=precision,
        dtype_bytes=b,
        world_size=_world_size(config),
        shards=_shards(config),
        compute_dtype_bytes=_fsdp_compute_bytes(config),
        recompute_head=bool(setting(config, "model.recompute_head")),
        cpu_sampler=setting(config, "trainer.accelerator", "auto") == "cpu",
    )
    return replace(shape, **overrides)


def config_dims(config: Any, model_config: str | None = None) -> ModelDims:
    """`ModelDims` of the config's model, built on the meta device from its transformers config.

    Args:
        config: the parsed `fit` config.
        model_config: a folder or `config.json` to read instead of `model.policy.name_or_path`
            (for a hub id when the hub is out of reach).
    """
    from safegrpo_pl.policy.model import LoraSettings, build_on_meta, load_model_config
    from safegrpo_pl.policy.tiny_models import resolve_model_path

    source = model_config or resolve_model_path(str(setting(config, "model.policy.name_or_path")))
    trust = bool(setting(config, "model.policy.trust_remote_code", False))
    hf_config = load_model_config(source, trust_remote_code=trust)
    lora = setting(config, "model.policy.lora")
    settings = None
    if lora is not None:
        settings = LoraSettings(**(lora.as_dict() if hasattr(lora, "as_dict") else dict(lora)))
    freeze = bool(setting(config, "model.policy.freeze_vision_tower", False))
    return model_dims(build_on_meta(hf_config, settings, freeze_vision_tower=freeze), hf_config)


def _divisors_below(n: int, limit: int) -> list[int]:
    """Divisors of n smaller than `limit`, largest first."""
    return [d for d in range(limit - 1, 0, -1) if n % d == 0]


def verdict(dims: ModelDims, run: RunShape, gpu_memory: float, margin: float = 0.1) -> Verdict:
    """Whether `run` fits, and if not, the settings that make it fit.

    Each setting is tried only when a phase it bounds is over budget, and set to the largest
    value that brings its phases under it (the smallest when none does): the rollout chunk
    bounds sampling and the log-prob passes; gradient checkpointing, then the micro-batch,
    bound the training pass.
    """
    budget = gpu_memory * (1 - margin)
    if estimate(dims, run).peak <= budget:
        return Verdict(gpu_memory, margin, True, {}, None)
    changes: dict[str, Any] = {}
    for field_name, key, candidates, phases in _knobs(run):

        def over(trial: RunShape, phases: tuple[str, ...] = phases) -> bool:
            plan = estimate(dims, trial)
            return any(plan.phase_total(p) > budget for p in phases if p in plan.phases)

        if not candidates or not over(run):
            continue
        fitting = [v for v in candidates if not over(replace(run, **{field_name: v}))]
        value = fitting[0] if fitting else candidates[-1]
        run, changes[key] = replace(run, **{field_name: value}), value
    peak = estimate(dims, run).peak
    if peak <= budget:
        return Verdict(gpu_memory, margin, False, changes, peak)
    return Verdict(gpu_memory, margin, False, {}, None)


def _knobs(run: RunShape) -> list[tuple[str, str, list[Any], tuple[str, ...]]]:
    """(RunShape field, config key, values to try largest first, phases it bounds)."""
    rollout = ("sampling", "log-probs")
    return [
        (
            "rollout_chunk",
            "model.rollout_micro_batch_size",
            _divisors_below(run.rollout_batch, run.chunk),
            rollout,
        ),
        (
            "gradient_checkpointing",
            "model.policy.gradient_checkpointing",
            [] if run.gradient_checkpointing else [True],
            ("training",),
        ),
        (
            "micro_batch",
            "model.micro_batch_size",
            _divisors_below(run.mini_batch or run.rollout_batch, run.micro),
            ("training",),
        ),
    ]


def plan_report(
    plan: MemoryPlan, run: RunShape, result: Verdict, *, all_phases: bool = False
) -> str:
    """The plan as a table: resident parts, the peak phase's parts (or, with `all_phases`,
    every phase's), the total and the verdict."""
    lines = [f"per-device memory plan ({run.world_size} device(s), GiB)", ""]
    width = 44
    for name, value in plan.resident.items():
        lines.append(f"  {name:<{width}} {value / GIB:>9.2f}")
    for phase in plan.phases if all_phases else [plan.peak_phase]:
        peak = " (peak)" if all_phases and phase == plan.peak_phase else ""
        lines.append(f"  -- {'phase' if all_phases else 'peak phase'}: {phase}{peak}")
        for name, value in plan.phases[phase].items():
            lines.append(f"  {name:<{width}} {value / GIB:>9.2f}")
        if all_phases:
            lines.append(f"  {'total':<{width}} {plan.phase_total(phase) / GIB:>9.2f}")
    lines.append(f"  {'total (peak)':<{width}} {plan.peak / GIB:>9.2f}")
    lines.append("")
    others = ", ".join(f"{n} {plan.phase_total(n) / GIB:.2f}" for n in plan.phases)
    lines.append(f"  phase totals: {others}")
    budget = result.gpu_memory * (1 - result.margin)
    free = result.gpu_memory - plan.peak
    if result.fits:
        lines.append(
            f"fits {result.gpu_memory / GIB:.0f} GiB: {free / GIB:.2f} GiB "
            f"({free / result.gpu_memory:.0%}) free, at least {result.margin:.0%} asked"
        )
    elif result.changes:
        change = ", ".join(f"--{k} {_yaml(v)}" for k, v in result.changes.items())
        lines.append(
            f"does NOT fit {result.gpu_memory / GIB:.0f} GiB with {result.margin:.0%} margin "
            f"(needs {plan.peak / GIB:.2f}, budget {budget / GIB:.2f}); "
            f"set {change}: peak {result.fixed_peak / GIB:.2f} GiB"
        )
    else:
        more = (
            "more devices to shard over (trainer.devices, trainer.num_nodes)"
            if run.shards
            else "shard with FSDP2 (strategy: ModelParallelStrategy, as configs/qwen-full.yaml)"
        )
        lines.append(
            f"does NOT fit {result.gpu_memory / GIB:.0f} GiB (needs {plan.peak / GIB:.2f}); no "
            f"chunk, checkpointing or micro-batch setting fits: {more}, LoRA or shorter lengths"
        )
    return "\n".join(lines)


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def plan_json(dims: ModelDims, run: RunShape, plan: MemoryPlan, result: Verdict) -> dict:
    """Everything the table shows, in bytes and GiB, for `--json`."""
    return {
        "peak_bytes": plan.peak,
        "peak_gib": plan.peak / GIB,
        "peak_phase": plan.peak_phase,
        "resident_bytes": plan.resident,
        "phase_bytes": plan.phases,
        "phase_totals_bytes": {n: plan.phase_total(n) for n in plan.phases},
        "gpu_memory_bytes": result.gpu_memory,
        "margin": result.margin,
        "fits": result.fits,
        "changes": result.changes,
        "fixed_peak_bytes": result.fixed_peak,
        "run": asdict(run),
        "model": asdict(dims),
    }


class _Parser(OneLineParserErrors, argparse.ArgumentParser):
    """`plan`'s own options: one-line errors, no abbreviations."""


def main(argv: Sequence[str] | None = None) -> dict:
    """`plan`: the estimate for a `fit` config; returns what `--json` writes.

    Raises:
        SystemExit: status 1 when the run does not fit (after the table and the JSON).
    """
    parser = _Parser(
        prog="python -m safegrpo_pl plan",
        description="Per-device peak memory of `fit` with the same config; nothing is loaded.",
        epilog="Any other argument (--config FILE, --model.key value) is read as by `fit`. "
        "Exit status 1 when the run does not fit, so a launch script can stop on it.",
    )
    parser.add_argument("--gpu_memory", default="80GB", help="memory of one device (80GB)")
    parser.add_argument("--margin", type=float, default=0.1, help="fraction to leave free")
    parser.add_argument("--json", help="also write the plan to this JSON file")
    parser.add_argument("--model_config", help="config.json or folder instead of the hub id")
    parser.add_argument(
        "--image_tokens", type=int, default=1024, help="image tokens per prompt (vision memory)"
    )
    parser.add_argument("--all_phases", action="store_true", help="every phase part by part")
    ours, rest = parser.parse_known_args(list(sys.argv[2:] if argv is None else argv))
    config = read_config(rest)
    dims = config_dims(config, ours.model_config)
    run = run_shape(config, image_tokens=ours.image_tokens)
    plan = estimate(dims, run)
    result = verdict(dims, run, parse_memory(ours.gpu_memory), ours.margin)
    sys.stdout.write(plan_report(plan, run, result, all_phases=ours.all_phases) + "\n")
    payload = plan_json(dims, run, plan, result)
    if ours.json:
        with open(ours.json, "w") as f:
            json.dump(payload, f, indent=2)
    if not result.fits:
        raise SystemExit(1)  # the table above says why and what to change
    return payload
