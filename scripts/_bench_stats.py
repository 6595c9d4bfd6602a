"""Pure helpers of the benchmark (`scripts/bench.py`): settings, medians, ratios, the step
breakdown, the logged phase timings and markdown tables, plus two readers of this process's
memory. No torch, no subprocesses: unit-tested in `tests/test_bench.py`.

Definitions used in the report (stated once, here):
- **step time**: wall-clock seconds from the end of one optimiser step to the end of the next,
  so it covers everything a step costs (data collation, rollout, scoring, log-prob passes,
  backward, optimiser, logging), for both trainers alike. The first (warm-up) step is dropped.
- **step CPU time**: the same interval in process CPU seconds (`time.process_time`). Every
  child runs ONE torch thread, so on an idle core CPU time equals wall time; on a shared machine
  it is what the step cost, without the time spent waiting for a core that other jobs held
  (measured here: the same run's wall-clock level moved 2x between processes as other jobs came
  and went). The headline ratios ours/TRL use CPU time; wall-clock ratios are reported beside.
- **rollout tokens/s**: completion tokens sampled in a step divided by the seconds spent
  sampling (ours: the `time/generation` seconds the module logs; TRL: its `model.generate`
  call); CPU seconds for the headline, wall seconds beside it. TRL's generate CPU seconds are
  measured around the call; ours are the logged wall seconds scaled by the step's CPU/wall
  ratio (`cpu_seconds_estimate`), since the module logs wall time only.
- **overhead**: everything outside generation and the forward/backward passes (the old and
  reference log-prob passes and the policy's forward+backward): reward scoring, the optimiser
  step and everything else, as a share of the step time.
- **matrix floor**: one more step after the timed ones runs under `torch.profiler` (in both
  trainers); the own CPU seconds of its matrix products and fused attention kernels
  (`MATRIX_KERNELS`) are what that work costs with zero overhead. Ours over TRL's step time is
  the lowest step-time ratio this work can reach with these kernels at these shapes. The peak
  RSS is read before that step (the profiler's records take memory).
"""

from __future__ import annotations

import os
import resource
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Phases whose seconds `SafeGRPOModule` logs as `time/<phase>` every step, in step order.
PHASES: tuple[str, ...] = (
    "generation",
    "reward",
    "old_logprobs",
    "ref_logprobs",
    "policy_forward_backward",
    "optimizer",
)
# The logged metric of a phase is TIME_PREFIX + phase; TIME_TOTAL is their sum (not a phase).
TIME_PREFIX = "time/"
TIME_TOTAL = "time/step_total"
# Phases that are model compute (sampling and the forward/backward passes), not overhead.
COMPUTE_PHASES: frozenset[str] = frozenset(
    {"generation", "old_logprobs", "ref_logprobs", "policy_forward_backward"}
)
# The kernels that do a model's arithmetic, as `torch.profiler` names them: the matrix
# products and the fused attention kernels. Their own time in a step is what the same work
# costs at the same shapes with no overhead at all; everything else in the step is overhead.
MATRIX_KERNELS: frozenset[str] = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    }
)


@dataclass(frozen=True)
class BenchSettings:
    """The work both trainers do per run; identical for ours and TRL's.

    Attributes:
        prompts_per_step: prompts per rollout batch (one optimiser step per batch).
        group_size: completions per prompt (G).
        max_new_tokens: completion length; EOS is suppressed so every completion has it.
        lr: AdamW learning rate (constant).
        kl_coef: KL coefficient (TRL's `beta`).
        warmup_steps: steps run first and not timed (lazy initialisation, allocator warm-up).
        steps: timed optimiser steps per run.
        repeats: runs per trainer, alternated ours/TRL, each in a fresh process.
        hidden_size: width of the tiny text-only Qwen3 both trainers train. 256, not 128:
            at 128 a decode step is bound by per-op dispatch (~0.1 ms per op on one thread),
            the same in both trainers, so the comparison would time Python, not the work.
        num_layers: its decoder layers (2: the ratio hardly depends on it; the time does).
        threads: torch intra-op threads in every child process (1 by default: on a shared 2-core
            machine, 2 OpenMP threads competing with other jobs run 10-20x slower).
        seed: seed of the model weights, the demo prompts and the sampling.
        lora: train LoRA adapters (reference = adapters off) instead of all weights.
        rollout_chunk: our `rollout_micro_batch_size` (prompts sampled and re-scored at once):
            on, at half the rollout batch, so the comparison times the memory-bounded path.
        mfu_rows, mfu_prompt, mfu_completion: the train-pass efficiency section's work: rows
            of prompt + completion tokens through a tiny Qwen3 of width `wide_size`.
        wide_size: width of the two wide models (4 layers, 8 heads): the train-pass efficiency
            model, where matmuls must dominate, and the reference-memory Qwen2.5-VL, where a
            second copy of the weights (~150 MB at 1024) must show in the peak RSS.
        scaling_groups, scaling_lengths: the scaling section's G and completion lengths.
        decode: our `model.sampling.decode` ("compiled" compiles in the untimed warm-up step:
            its compile time is not in the step times; `scripts/decode_speed.py` measures it).
    """

    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 64
    lr: float = 1e-6
    kl_coef: float = 0.01
    warmup_steps: int = 1
    steps: int = 6
    repeats: int = 3
    hidden_size: int = 256
    num_layers: int = 2
    threads: int = 1
    seed: int = 0
    lora: bool = False
    rollout_chunk: int | None = 2
    mfu_rows: int = 16
    mfu_prompt: int = 128
    mfu_completion: int = 128
    wide_size: int = 1024
    scaling_groups: tuple[int, ...] = (4, 8, 16)
    scaling_lengths: tuple[int, ...] = (32, 64, 128)
    decode: str = "growing"

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    def with_(self, **changes: Any) -> BenchSettings:
        """A copy with `changes` applied (for the scaling sweep)."""
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BenchSettings:
        """The settings `as_dict` wrote (JSON turned the tuples into lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


QUICK = BenchSettings(steps=3, repeats=2)
"""`--quick`: fewer timed steps and repeats (the whole run stays under 5 minutes on 2 cores)."""

SMOKE = BenchSettings(
    prompts_per_step=2,
    group_size=2,
    max_new_tokens=8,
    steps=1,
    repeats=1,
    hidden_size=64,
    num_layers=1,
    rollout_chunk=1,
    mfu_rows=2,
    mfu_prompt=16,
    mfu_completion=16,
    wide_size=128,
    scaling_groups=(2, 4),
    scaling_lengths=(4, 8),
)
"""`--smoke`: every job at the smallest size that still runs its code (the test suite's run);
its figures mean nothing."""


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux `/proc`; NaN elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def logged_phases(metrics: Mapping[str, Any]) -> dict[str, float]:
    """`{phase: seconds}` from one step's logged metrics (`time/<phase>`; the total left out).

    Values may be tensors (Lightning stores logged numbers as 0-d tensors): `float` reads both.
    """
    return {
        key.removeprefix(TIME_PREFIX): float(value)
        for key, value in metrics.items()
        if key.startswith(TIME_PREFIX) and key != TIME_TOTAL
    }


def kernel_seconds(own_seconds: Mapping[str, float]) -> dict[str, float]:
    """What one profiled step spent: `matrix_s` in `MATRIX_KERNELS`, `profiled_s` in every op
    and region the profiler recorded, from `{name: own (self) CPU seconds}`."""
    return {
        "matrix_s": sum(v for k, v in own_seconds.items() if k in MATRIX_KERNELS),
        "profiled_s": sum(own_seconds.values()),
    }


def kernel_medians(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The median over repeats of each figure of the runs' `kernel_seconds` (NaN if none)."""
    return {
        key: median(run["kernel_seconds"][key] for run in runs if run.get("kernel_seconds"))
        for key in ("matrix_s", "profiled_s")
    }


def median(values: Iterable[float]) -> float:
    """The median of `values`; NaN for none (so a missing measurement shows, not crashes)."""
    values = list(values)
    return float(statistics.median(values)) if values else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    """`numerator / denominator`, NaN when the denominator is zero or not finite."""
    if (
        not denominator
        or denominator != denominator
        or denominator in (float("inf"), -float("inf"))
    ):
        return float("nan")
    return numerator / denominator


def step_intervals(step_end_times: Sequence[float], warmup_steps: int) -> list[float]:
    """Seconds per step from the end times of consecutive steps, warm-up steps dropped.

    Step k (0-based) costs `end[k] - end[k-1]`; step 0 has no predecessor, so with
    `warmup_steps` >= 1 the timed steps are `warmup_steps .. len-1`.

    Raises:
        ValueError: if `warmup_steps` is 0 (the first step's cost is unknown) or there are fewer
            end times than warm-up steps plus one.
    """
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps is {warmup_steps}; need >= 1 to time the first step")
    if len(step_end_times) <= warmup_steps:
        raise ValueError(
            f"{len(step_end_times)} step end times for {warmup_steps} warm-up steps: no timed step"
        )
    ends = list(step_end_times)
    return [ends[k] - ends[k - 1] for k in range(warmup_steps, len(ends))]


def step_breakdown(
    step_seconds: Sequence[float], phase_seconds: Sequence[Mapping[str, float]]
) -> dict[str, float]:
    """Median seconds per phase over the timed steps, plus `other` = step minus the phases.

    `other` is computed per step, then its median is taken (medians do not add up, so the parts
    of the result need not sum to the median step time exactly).

    Args:
        step_seconds: seconds per timed step.
        phase_seconds: per timed step, the module's phase timings (missing phase = 0 s).

    Returns:
        `{phase: median seconds}` for every name in `PHASES`, `other`, and `step`.
    """
    if len(step_seconds) != len(phase_seconds):
        raise ValueError(
            f"{len(step_seconds)} step times but {len(phase_seconds)} phase records: "
            "they must describe the same steps"
        )
    out = {phase: median(float(p.get(phase, 0.0)) for p in phase_seconds) for phase in PHASES}
    others = [
        step - sum(float(p.get(phase, 0.0)) for phase in PHASES)
        for step, p in zip(step_seconds, phase_seconds, strict=True)
    ]
    out["other"] = median(others)
    out["step"] = median(step_seconds)
    return out


def overhead_fraction(
    step_seconds: Sequence[float], phase_seconds: Sequence[Mapping[str, float]]
) -> float:
    """Median over steps of the share of a step outside `COMPUTE_PHASES`."""
    shares = [
        ratio(step - sum(float(p.get(ph, 0.0)) for ph in COMPUTE_PHASES), step)
        for step, p in zip(step_seconds, phase_seconds, strict=True)
    ]
    return median(shares)


def cpu_seconds_estimate(
    wall_seconds: Sequence[float],
    step_seconds: Sequence[float],
    step_cpu_seconds: Sequence[float],
) -> list[float]:
    """CPU seconds of a part of each step, from its wall seconds and the step's CPU/wall ratio.

    For a phase logged in wall time only: with one torch thread, the share of wall time the
    process spent on a core is taken to be the same in the phase as in its whole step.
    """
    if not len(wall_seconds) == len(step_seconds) == len(step_cpu_seconds):
        raise ValueError(
            f"{len(wall_seconds)} phase times, {len(step_seconds)} step times and "
            f"{len(step_cpu_seconds)} step CPU times: they must describe the same steps"
        )
    return [
        part * ratio(cpu, wall)
        for part, wall, cpu in zip(wall_seconds, step_seconds, step_cpu_seconds, strict=True)
    ]


def pooled(runs: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    """Concatenate the per-step list `key` of several runs (all repeats of one trainer)."""
    return [value for run in runs for value in run[key]]


def summarize_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Medians of one trainer's repeats: step time, rollout tokens/s, peak RSS, and the
    profiled step's kernel seconds.

    Step time and tokens/s pool the timed steps of every repeat; peak RSS is one number per
    process, so its median is over repeats.
    """
    steps = pooled(runs, "step_seconds")
    generation = pooled(runs, "generation_seconds")
    generation_cpu = pooled(runs, "generation_cpu_seconds")
    tokens = pooled(runs, "completion_tokens")
    return {
        "step_cpu_s": median(pooled(runs, "step_cpu_seconds")),
        "step_cpu_s_per_repeat": [median(run["step_cpu_seconds"]) for run in runs],
        "step_time_s": median(steps),
        "step_time_s_per_repeat": [median(run["step_seconds"]) for run in runs],
        "rollout_tokens_per_cpu_s": median(
            ratio(t, g) for t, g in zip(tokens, generation_cpu, strict=True)
        ),
        "rollout_tokens_per_s": median(
            ratio(t, g) for t, g in zip(tokens, generation, strict=True)
        ),
        "completion_tokens_per_step": median(tokens),
        "peak_rss_mb": median(run["peak_rss_mb"] for run in runs),
        "peak_rss_mb_per_repeat": [run["peak_rss_mb"] for run in runs],
        "rss_before_train_mb": median(run.get("rss_before_train_mb", float("nan")) for run in runs),
        "step_time_spread": spread(steps),
        "kernels": kernel_medians(runs),
    }


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy a set of timings is (0 = identical)."""
    if not values:
        return float("nan")
    return ratio(max(values) - min(values), median(values))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats to 3 significant figures, numbers right-aligned."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if value != value else f"{value:.3g}"
        return str(value)

    for row in rows:
        if len(row) != len(headers):
            raise ValueError(
                f"row {row!r} has {len(row)} cells; the table has {len(headers)} columns"
            )
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) if rows else False
        for i in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)
