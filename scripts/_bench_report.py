"""The benchmark's report: the machine it ran on, the targets, and its markdown tables.

Every table is data (`TableSpec`: a title, where its rows come from, and its columns, each a
header, a key and an optional format), rendered by `render_table`; `markdown_report` strings
them together. Keys are dotted paths into a row (`"ours.step_cpu_s"`) or functions of it.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _bench_stats as stats

REPO = Path(__file__).resolve().parents[1]

TARGETS = {  # name: (comparison, bound); listed in docs/method.md appendix B
    "step_time_ratio_vs_trl": ("<=", 0.5),
    "peak_rss_ratio_vs_trl": ("<=", 1.0),
    "overhead_fraction": ("<=", 0.10),
    "ref_memory_ratio": ("<=", 1.05),
    "rollout_speedup_vs_naive": (">", 1.0),
    "train_pass_mfu": (">=", 0.7),
    "train_pass_vs_plain": (">=", 0.8),
}

Key = str | Callable[[Any], Any]


def lookup(record: Any, key: Key) -> Any:
    """`key(record)`, or the value at the dotted path `key` ("ours.step_cpu_s")."""
    if callable(key):
        return key(record)
    for part in key.split("."):
        record = record[part]
    return record


@dataclass(frozen=True)
class Column:
    """One column: its header, where its cell comes from in a row, and how it is written
    (None: as `stats.markdown_table` writes it, floats to 3 significant figures)."""

    header: str
    key: Key
    fmt: Callable[[Any], Any] | None = None

    def cell(self, record: Any) -> Any:
        value = lookup(record, self.key)
        return value if self.fmt is None else self.fmt(value)


@dataclass(frozen=True)
class TableSpec:
    """A table: its title (text, or a function of its section), the report key of its section,
    the rows of that section, and its columns. An absent or empty section, or no rows: no
    table."""

    title: str | Callable[[Any], str]
    section: str
    rows: Callable[[Any, Mapping[str, Any]], Sequence[Any]]
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class Pair:
    """A row comparing two sides (ours/TRL, shared/naive): its label, the keys of both sides'
    values in the section, and the key of their ratio."""

    label: str
    left: Key
    right: Key
    ratio: Key


def paired_rows(pairs: Sequence[Pair]) -> Callable[[Any, Mapping[str, Any]], list[Any]]:
    """The rows of a two-sided table: label, left, right and ratio per `Pair`."""

    def rows(section: Any, report: Mapping[str, Any]) -> list[Any]:
        return [
            {
                "label": p.label,
                "left": lookup(section, p.left),
                "right": lookup(section, p.right),
                "ratio": lookup(section, p.ratio),
            }
            for p in pairs
        ]

    return rows


def paired_columns(left: str, right: str, ratio: str, label: str = "") -> tuple[Column, ...]:
    return (
        Column(label, "label"),
        Column(left, "left"),
        Column(right, "right"),
        Column(ratio, "ratio"),
    )


def _breakdown_rows(comparison: Any, report: Mapping[str, Any]) -> list[Any]:
    """Each phase, the rest of the step (`other`) and the whole step, with its share."""
    b = comparison["breakdown"]
    return [
        {"phase": part, "seconds": b[part], "share": stats.ratio(b[part], b["step"])}
        for part in (*stats.PHASES, "other")
    ] + [{"phase": "step", "seconds": b["step"], "share": 1.0}]


def _width_rows(widths: Any, report: Mapping[str, Any]) -> list[Any]:
    """Every width measured: the headline comparison's and the extra widths'."""
    comparison = report.get("comparison")
    headline = [(report["settings"]["hidden_size"], comparison)] if comparison else []
    results = headline + [(int(w), r) for w, r in widths.items()]
    return [{"hidden": w, **r} for w, r in sorted(results, key=lambda item: item[0])]


def _if_profiled(
    rows: Callable[[Any, Mapping[str, Any]], list[Any]],
) -> Callable[[Any, Mapping[str, Any]], list[Any]]:
    """`rows`, or none for a comparison without a profiled step (a report from before it)."""
    return lambda comparison, report: (
        rows(comparison, report) if "kernels" in comparison["ours"] else []
    )


def _yes_no(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[met]


def _or_na(value: Any) -> Any:
    return value if value is not None else "n/a"


TABLES: tuple[TableSpec, ...] = (
    TableSpec(
        "Ours vs TRL (medians)",
        "comparison",
        paired_rows(
            [
                Pair(
                    "step CPU time (s)",
                    "ours.step_cpu_s",
                    "trl.step_cpu_s",
                    "step_time_ratio_vs_trl",
                ),
                Pair(
                    "step wall time (s)",
                    "ours.step_time_s",
                    "trl.step_time_s",
                    "step_time_ratio_vs_trl_wall",
                ),
                Pair(
                    "rollout tokens per CPU s",
                    "ours.rollout_tokens_per_cpu_s",
                    "trl.rollout_tokens_per_cpu_s",
                    "rollout_tokens_per_s_ratio_vs_trl",
                ),
                Pair(
                    "rollout tokens per wall s",
                    "ours.rollout_tokens_per_s",
                    "trl.rollout_tokens_per_s",
                    "rollout_tokens_per_s_ratio_vs_trl_wall",
                ),
                Pair(
                    "peak RSS (MB)", "ours.peak_rss_mb", "trl.peak_rss_mb", "peak_rss_ratio_vs_trl"
                ),
                Pair(
                    "RSS before training (MB)",
                    "ours.rss_before_train_mb",
                    "trl.rss_before_train_mb",
                    lambda c: stats.ratio(
                        c["ours"]["rss_before_train_mb"], c["trl"]["rss_before_train_mb"]
                    ),
                ),
                Pair(
                    "wall step-time spread (max-min)/median",
                    "ours.step_time_spread",
                    "trl.step_time_spread",
                    lambda c: "",
                ),
            ]
        ),
        paired_columns("ours", "TRL", "ours/TRL"),
    ),
    TableSpec(
        "Our step, by phase (median s)",
        "comparison",
        _breakdown_rows,
        (Column("phase", "phase"), Column("seconds", "seconds"), Column("share", "share")),
    ),
    TableSpec(
        "One more step, profiled: own CPU seconds (matrix floor)",
        "comparison",
        _if_profiled(
            paired_rows(
                [
                    Pair(
                        "matrix products and attention kernels",
                        "ours.kernels.matrix_s",
                        "trl.kernels.matrix_s",
                        lambda c: stats.ratio(
                            c["ours"]["kernels"]["matrix_s"], c["trl"]["kernels"]["matrix_s"]
                        ),
                    ),
                    Pair(
                        "every op and region profiled",
                        "ours.kernels.profiled_s",
                        "trl.kernels.profiled_s",
                        lambda c: stats.ratio(
                            c["ours"]["kernels"]["profiled_s"], c["trl"]["kernels"]["profiled_s"]
                        ),
                    ),
                    Pair(
                        "floor: our matrix products / TRL's step CPU time",
                        lambda c: "",
                        lambda c: "",
                        "matrix_floor_ratio_vs_trl",
                    ),
                ]
            )
        ),
        paired_columns("ours", "TRL", "ours/TRL"),
    ),
    TableSpec(
        "Ratio against model width",
        "widths",
        _width_rows,
        (
            Column("hidden", "hidden"),
            Column("ours step CPU (s)", "ours.step_cpu_s"),
            Column("TRL step CPU (s)", "trl.step_cpu_s"),
            Column("step ours/TRL (CPU)", "step_time_ratio_vs_trl"),
            Column("step ours/TRL (wall)", "step_time_ratio_vs_trl_wall"),
            Column("rollout tok/s ours/TRL (CPU)", "rollout_tokens_per_s_ratio_vs_trl"),
        ),
    ),
    TableSpec(
        "Scaling (ours)",
        "scaling",
        lambda scaling, report: scaling["rows"],
        (
            Column("G", "group_size"),
            Column("max tokens", "max_new_tokens"),
            Column("step CPU (s)", "step_cpu_s"),
            Column("step wall (s)", "step_time_s"),
            Column("generation (s)", "breakdown.generation"),
            Column(
                "log-prob + fwd/bwd (s)",
                lambda r: (
                    r["breakdown"]["ref_logprobs"] + r["breakdown"]["policy_forward_backward"]
                ),
            ),
            Column("rollout tokens/s", "rollout_tokens_per_s"),
        ),
    ),
    TableSpec(
        lambda ro: (
            f"Shared-prefix rollout vs naive (tiny Qwen2.5-VL, {ro['prompt_tokens']} prompt "
            f"tokens incl. {ro['image_tokens']} image tokens)"
        ),
        "rollout",
        paired_rows(
            [
                Pair(
                    "sampling",
                    "medians_s.sample_shared_cpu",
                    "medians_s.sample_naive_cpu",
                    "rollout_speedup_vs_naive",
                ),
                Pair(
                    "log-prob pass",
                    "medians_s.logprobs_shared_cpu",
                    "medians_s.logprobs_naive_cpu",
                    "logprob_speedup_vs_naive",
                ),
            ]
        ),
        paired_columns("shared prefix", "naive", "speed-up", label="CPU seconds"),
    ),
    TableSpec(
        lambda rm: f"Reference memory (tiny Qwen2.5-VL, hidden {rm.get('hidden_size', 1024)})",
        "ref_memory",
        lambda rm, report: [{"training": k, **v} for k, v in rm.items() if isinstance(v, dict)],
        (
            Column("training", "training"),
            Column("peak RSS kl 0.01 (MB)", "peak_rss_mb_kl"),
            Column("peak RSS kl 0 (MB)", "peak_rss_mb_no_kl"),
            Column("ratio", "ratio"),
        ),
    ),
    TableSpec(
        lambda m: (
            f"Train pass vs the matmul peak (tiny Qwen3 text, hidden {m.get('hidden_size', 1024)}, "
            f"4 layers, "
            f"{m['rows']} x ({m['prompt_tokens']} + {m['completion_tokens']}) tokens)"
        ),
        "mfu",
        lambda m, report: [
            {"pass": "ours", "flops": m["ours_flops"], "mfu": m["train_pass_mfu"]},
            {"pass": "plain transformers", "flops": m["plain_flops"], "mfu": m["plain_mfu"]},
            {"pass": "matmul loop (peak)", "flops": m["matmul_peak_flops"], "mfu": 1.0},
        ],
        (
            Column("pass", "pass"),
            Column("GFLOP/s", "flops", lambda v: round(v / 1e9, 1)),
            Column("share of matmul peak", "mfu"),
        ),
    ),
    TableSpec(
        "Targets",
        "targets",
        lambda targets, report: [{"figure": k, **v} for k, v in targets.items()],
        (
            Column("figure", "figure"),
            Column("value", "value", _or_na),
            Column("target", "target"),
            Column("met", "met", _yes_no),
        ),
    ),
)


def render_table(spec: TableSpec, report: Mapping[str, Any]) -> str | None:
    """The markdown of one table, or None when the report lacks its section or its rows."""
    section = report.get(spec.section)
    if not section:
        return None
    rows = [
        [column.cell(record) for column in spec.columns] for record in spec.rows(section, report)
    ]
    if not rows:
        return None
    title = spec.title(section) if callable(spec.title) else spec.title
    return f"### {title}\n" + stats.markdown_table([c.header for c in spec.columns], rows)


def _preamble(report: Mapping[str, Any]) -> list[str]:
    """The machine and the work per step, as two sentences."""
    machine, s = report["machine"], report["settings"]
    return [
        f"Machine: {machine['processor']}, {machine['cpu_count']} cores, "
        f"{machine['threads_per_process']} torch thread(s) per process; torch "
        f"{machine['torch']}, transformers {machine['transformers']}, trl {machine['trl']}; "
        f"commit {machine['commit']}; load average {machine['load_average_start'][0]:.1f} at "
        f"start, {machine.get('load_average_end', [float('nan')])[0]:.1f} at end.",
        f"Work per step: {s['prompts_per_step']} prompts x G={s['group_size']} x "
        f"{s['max_new_tokens']} tokens, kl_coef {s['kl_coef']}, lr {s['lr']}, "
        f"{s['steps']} timed steps after {s['warmup_steps']} warm-up, {s['repeats']} repeats; "
        f"tiny Qwen3 text, hidden {s['hidden_size']}, {s['num_layers']} layers.",
    ]


def markdown_report(report: Mapping[str, Any]) -> str:
    """Every table of the report, as markdown."""
    tables = [render_table(spec, report) for spec in TABLES]
    parts = _preamble(report) + [t for t in tables if t is not None]
    if report.get("errors"):
        parts.append("### Errors\n" + "\n".join(f"- {e}" for e in report["errors"]))
    return "\n\n".join(parts) + "\n"


def check_targets(report: Mapping[str, Any]) -> dict[str, Any]:
    """Each target figure against its bound; `met` is None where the figure is missing."""
    checks = {}
    for name, (op, bound) in TARGETS.items():
        value = report.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            met = None
        else:
            met = {"<=": value <= bound, ">=": value >= bound, ">": value > bound}[op]
        checks[name] = {"value": value, "target": f"{op} {bound}", "met": met}
    passes = report.get("old_logprob_forward_passes_per_step")
    checks["no_old_logprob_forward_at_num_iterations_1"] = {
        "value": passes,
        "target": "== 0",
        "met": None if passes is None else passes == 0,
    }
    return checks


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def machine_info(threads: int) -> dict[str, Any]:
    """Where the benchmark ran: platform, cores, library versions, commit, load average."""
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads_per_process": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "commit": _git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else ""),
        "load_average_start": os.getloadavg(),
    }
