"""Benchmark: our GRPO step against TRL's `GRPOTrainer` on the same work (targets: docs/method.md appendix B).

    python scripts/bench.py --quick            # < 5 minutes on 2 cores; writes bench.json
    python scripts/bench.py                    # the full run (more steps, repeats, a 3x3 grid)
    python scripts/bench.py --out runs/bench/bench.json --threads 1
    python scripts/bench.py --smoke --out /tmp/b/bench.json   # every job at the smallest size

Sections, each measured in fresh child processes (`scripts/_bench_jobs.py`), so that every
peak resident memory belongs to one job alone:
1. **ours vs TRL**: the same tiny text-only Qwen3 (TRL cannot run a Qwen-VL here: it builds the
   processor through AutoProcessor, which needs torchvision), alternated ours/TRL/TRL/ours...,
   medians and ratios ours/TRL of step time, rollout tokens/s and peak RSS; the breakdown of our
   step from the phase timings the module logs (`time/*`); whether old log-probs cost an extra
   forward; and one more step in each, under `torch.profiler`, for the matrix floor: the
   seconds our step spends in matrix products over TRL's step, the lowest ratio this work
   allows with these kernels.
2. **scaling**: our step time against G (4, 8, 16) and completion length (32, 64, 128).
3. **rollout vs naive**: shared-prefix sampling and log-probs against `generate(
   num_return_sequences=G)` and a per-completion forward, on a tiny Qwen2.5-VL with image
   prompts and the full step-guided guide.
4. **reference memory**: peak RSS with kl_coef 0.01 over kl_coef 0, with LoRA, on a tiny
   Qwen2.5-VL wide enough that a second copy of its weights would show.
5. **train-pass efficiency** (`mfu`): the policy forward+backward's achieved FLOP/s as a share
   of this machine's matmul peak at the model's shapes (`train_pass_mfu`), and against a plain
   transformers forward+backward on the same model and tokens (`train_pass_vs_plain`), on a
   tiny Qwen3 of hidden 1024 and 4 layers (`scripts/_bench_mfu.py`).

Definitions (step time, tokens/s, overhead) are in `scripts/_bench_stats.py`; fairness settings
in `scripts/_bench_jobs.py`; the sections in `scripts/_bench_sections.py`, the tables and
targets in `scripts/_bench_report.py`; every name taken from the library in
`scripts/_bench_api.py`. Timings on a shared machine are noisy: every figure is a median and
the JSON keeps the raw per-step values and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_sections as sections
import _bench_stats as stats
from _bench_report import check_targets, machine_info, markdown_report

log = logging.getLogger("bench")
SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent

SECTIONS = ("compare", "widths", "scaling", "rollout", "refmem", "mfu")
FAIRNESS = [
    "same model folder (tiny random text-only Qwen3, float32), same demo prompts in the same "
    "order as the same chat-templated string",
    "same G, prompts per step, completion length, temperature 1, top-p 1, top-k off, lr, "
    "weight decay 0.01, grad-norm clip 1.0, beta (kl_coef), optimiser steps",
    "EOS and vision special tokens suppressed while sampling in both (ours: added to the "
    "module's suppress ids; TRL: generation_kwargs suppress_tokens), so every completion has "
    "exactly max_new_tokens tokens",
    "one optimiser step per rollout (TRL: steps_per_generation=1, num_iterations=1), token-mean "
    "loss (TRL loss_type='dapo'), group-std advantages",
    "no gradient checkpointing, no bf16, no dropout, full-weight training (reference = a "
    "frozen copy) in both unless --lora",
    "one torch thread per process in both (OMP_NUM_THREADS too)",
    "TRL's reward is our safegrpo_pl.core.rewards.safety_reward through a reward function",
]


# -- report ------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer steps/repeats (< 5 min)")
    size.add_argument(
        "--smoke",
        action="store_true",
        help="every job once at the smallest size (the test suite's check; figures mean nothing)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "runs" / "bench" / "bench.json",
        help="JSON report path (a .md with the tables is written beside it)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="models, job files and child logs (default: the safegrpo_pl cache folder/bench, "
        "outside the repo, so a cleanup of runs/ mid-run cannot delete them)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs per trainer")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument(
        "--widths",
        default="auto",
        help="extra model widths for the ours/TRL ratio (e.g. 128,512, or none); auto: 128, "
        "none in --quick and --smoke",
    )
    parser.add_argument("--lora", action="store_true", help="LoRA in both trainers")
    parser.add_argument(
        "--decode",
        choices=("growing", "static", "compiled"),
        default=None,
        help="our model.sampling.decode (default growing, the library's)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated subset of " + ",".join(SECTIONS) + " (e.g. --sections mfu)",
    )
    return parser.parse_args(argv)


def default_workdir() -> Path:
    import _bench_api as api

    return api.default_cache_dir() / "bench"


def parse_widths(text: str, *, quick: bool, headline: int) -> tuple[int, ...]:
    """The extra widths of `--widths`: "auto" is 128 (none with --quick); the headline is skipped."""
    if text == "auto":
        return () if quick else tuple(w for w in (128,) if w != headline)
    if text == "none":
        return ()
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError as err:
        raise SystemExit(
            f"--widths {text!r}: expected comma-separated integers, e.g. 128,512"
        ) from err
    return tuple(w for w in widths if w != headline)


def settings_from(args: argparse.Namespace) -> stats.BenchSettings:
    settings = stats.SMOKE if args.smoke else stats.QUICK if args.quick else stats.BenchSettings()
    changes = {
        k: v
        for k, v in (("repeats", args.repeats), ("steps", args.steps), ("threads", args.threads))
        if v is not None
    }
    if args.lora:
        changes["lora"] = True
    if args.decode:
        changes["decode"] = args.decode
    return settings.with_(**changes)


# The headline figures, copied to the top of the report: (report section, figure).
HEADLINE = (
    ("comparison", "step_time_ratio_vs_trl"),
    ("comparison", "peak_rss_ratio_vs_trl"),
    ("comparison", "rollout_tokens_per_s_ratio_vs_trl"),
    ("comparison", "overhead_fraction"),
    ("comparison", "old_logprob_forward_passes_per_step"),
    ("ref_memory", "ref_memory_ratio"),
    ("rollout", "rollout_speedup_vs_naive"),
    ("rollout", "logprob_speedup_vs_naive"),
    ("mfu", "train_pass_mfu"),
    ("mfu", "train_pass_vs_plain"),
)
REPORT_KEYS = {"compare": "comparison", "refmem": "ref_memory"}  # section name -> report key


def section_runs(
    args: argparse.Namespace,
    settings: stats.BenchSettings,
    workdir: Path,
    paths: dict[str, str],
    widths: tuple[int, ...],
) -> list[tuple[str, Callable[[], Any]]]:
    """Every section, in order, as (name, a function that measures it)."""
    full = not (args.quick or args.smoke)
    repeats = 1 if args.smoke else 2 if args.quick else 5
    return [
        ("compare", lambda: sections.compare_with_trl(paths["text"], settings, workdir)),
        ("widths", lambda: sections.width_sensitivity(paths, settings, workdir, widths)),
        ("scaling", lambda: sections.scaling(paths, settings, workdir, full_grid=full)),
        (
            "rollout",
            lambda: sections.rollout_vs_naive(
                paths, settings, workdir, repeats=repeats, image_size=64 if args.smoke else 224
            ),
        ),
        ("refmem", lambda: sections.reference_memory(paths, settings, workdir, control=full)),
        (
            "mfu",
            lambda: sections.train_pass_efficiency(
                paths, settings, workdir, 1 if args.smoke else max(repeats, 3)
            ),
        ),
    ]


def run_sections(
    report: dict[str, Any],
    runs: list[tuple[str, Callable[[], Any]]],
    chosen: set[str],
    widths: tuple[int, ...],
) -> None:
    """Run the `chosen` sections into `report`; a failure is noted in `report["errors"]`."""
    for name, section in runs:
        if name not in chosen:
            continue
        try:
            result = section()
        except Exception as err:  # one broken section must not lose the others' results
            log.exception("section %s failed", name)
            report["errors"].append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        if name == "widths" and not widths:
            continue
        report[REPORT_KEYS.get(name, name)] = result


def write_report(report: dict[str, Any], out: Path) -> None:
    """bench.json (NaN as null) and bench.md (the tables) at `out`; the tables on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_json_safe(report), indent=1))
    tables = markdown_report(report)
    out.with_suffix(".md").write_text(tables)
    sys.stdout.write(tables)
    log.info("wrote %s and %s in %.0f s", out, out.with_suffix(".md"), report["elapsed_s"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = settings_from(args)
    chosen = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = chosen - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from {list(SECTIONS)}")
    workdir = (args.workdir or default_workdir()).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": [Path(sys.executable).name, *sys.argv],
        "quick": args.quick,
        "smoke": args.smoke,
        "machine": machine_info(settings.threads),
        "settings": settings.as_dict(),
        "fairness": FAIRNESS,
        "errors": [],
    }
    widths = parse_widths(
        args.widths, quick=args.quick or args.smoke, headline=settings.hidden_size
    )
    paths = sections.build_models(workdir, settings, widths)
    log.info("models ready in %.0f s: %s", time.perf_counter() - started, paths)
    run_sections(report, section_runs(args, settings, workdir, paths, widths), chosen, widths)
    report.update({figure: report.get(key, {}).get(figure) for key, figure in HEADLINE})
    report["targets"] = check_targets(report)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["elapsed_s"] = time.perf_counter() - started
    write_report(report, args.out.resolve())
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
