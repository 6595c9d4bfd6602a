"""Benchmark: our GRPO step against TRL's `GRPOTrainer` on the same work (issue 6).

    python scripts/bench.py --quick            # < 5 minutes on 2 cores; writes bench.json
    python scripts/bench.py                    # the full run (more steps, repeats, a 3x3 grid)
    python scripts/bench.py --out runs/bench/bench.json --threads 1

Sections, each measured in fresh child processes (`scripts/_bench_jobs.py`), so that every
peak resident memory belongs to one job alone:
1. **ours vs TRL**: the same tiny text-only Qwen3 (TRL cannot run a Qwen-VL here: it builds the
   processor through AutoProcessor, which needs torchvision), alternated ours/TRL/TRL/ours...,
   medians and ratios ours/TRL of step time, rollout tokens/s and peak RSS; the breakdown of our
   step from the module's `StepTimer`; whether old log-probs cost an extra forward.
2. **scaling**: our step time against G (4, 8, 16) and completion length (32, 64, 128).
3. **rollout vs naive**: shared-prefix sampling and log-probs against `generate(
   num_return_sequences=G)` and a per-completion forward, on a tiny Qwen2.5-VL with image
   prompts and the full step-guided guide.
4. **reference memory**: peak RSS with kl_coef 0.01 over kl_coef 0, with LoRA, on a tiny
   Qwen2.5-VL wide enough that a second copy of its weights would show.

Definitions (step time, tokens/s, overhead) are in `scripts/_bench_stats.py`; fairness settings
in `scripts/_bench_jobs.py`. Timings on a shared machine are noisy: every figure is a median and
the JSON keeps the raw per-step values and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_stats as stats

log = logging.getLogger("bench")
SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent

SECTIONS = ("compare", "widths", "scaling", "rollout", "refmem")
TARGETS = {  # name: (comparison, bound), from issue 6
    "step_time_ratio_vs_trl": ("<=", 0.5),
    "peak_rss_ratio_vs_trl": ("<=", 1.0),
    "overhead_fraction": ("<=", 0.10),
    "ref_memory_ratio": ("<=", 1.05),
    "rollout_speedup_vs_naive": (">", 1.0),
}

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
    "TRL's reward is our safegrpo_pl.rewards.safety_reward through a reward function",
]


# -- models ----------------------------------------------------------------------------------


def build_models(
    workdir: Path, settings: stats.BenchSettings, extra_widths: tuple[int, ...] = ()
) -> dict[str, str]:
    """Build (or reuse) the tiny models of every section under `workdir/models`.

    Keys: "text" (the comparison), "text-W" per extra width W, "vl" (rollout vs naive),
    "vl_wide" (reference memory).
    """
    from safegrpo_pl.demo_data import demo_corpus
    from safegrpo_pl.tiny_models import TinyModelSpec, build_tiny_model

    specs = {
        "text": TinyModelSpec(
            arch="qwen3_text",
            hidden_size=settings.hidden_size,
            num_layers=settings.num_layers,
            seed=settings.seed,
        ),
        **{
            f"text-{width}": TinyModelSpec(
                arch="qwen3_text",
                hidden_size=width,
                num_layers=settings.num_layers,
                seed=settings.seed,
            )
            for width in extra_widths
        },
        "vl": TinyModelSpec(
            arch="qwen2_5_vl",
            hidden_size=settings.hidden_size,
            num_layers=settings.num_layers,
            vision_hidden_size=64,
            seed=settings.seed,
        ),
        # Wide enough that one more copy of the weights (~150 MB) would show in peak RSS.
        "vl_wide": TinyModelSpec(
            arch="qwen2_5_vl", hidden_size=1024, num_layers=4, num_heads=8, seed=settings.seed
        ),
    }
    corpus = demo_corpus()
    paths = {}
    for name, spec in specs.items():
        folder = workdir / "models" / name
        marker = folder / "tiny_spec.json"
        wanted = json.dumps({**spec.__dict__, "corpus": len(corpus)}, sort_keys=True)
        stamp = folder / "bench_stamp.json"
        if not (marker.exists() and stamp.exists() and stamp.read_text() == wanted):
            build_tiny_model(folder, corpus=corpus, spec=spec)
            stamp.write_text(wanted)
        paths[name] = str(folder)
    return paths


# -- child processes -------------------------------------------------------------------------


class JobFailed(RuntimeError):
    """A child job exited with an error (its log tail is in the message)."""


def run_job(
    name: str,
    job: dict[str, Any],
    workdir: Path,
    threads: int,
    env_extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one job in a fresh process; its output goes to `workdir/logs/NAME.log`."""
    (workdir / "jobs").mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    job_file = workdir / "jobs" / f"{name}.json"
    result_file = workdir / "jobs" / f"{name}.result.json"
    log_file = workdir / "logs" / f"{name}.log"
    job_file.write_text(json.dumps(job, indent=1))
    result_file.unlink(missing_ok=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
        **(env_extra or {}),
    )
    start = time.perf_counter()
    with log_file.open("w") as out:
        code = subprocess.call(
            [sys.executable, str(SCRIPTS / "_bench_jobs.py"), str(job_file), str(result_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    seconds = time.perf_counter() - start
    if code != 0 or not result_file.exists():
        text = log_file.read_text(errors="replace") if log_file.exists() else "(log file gone)"
        tail = "\n".join(text.splitlines()[-25:])
        raise JobFailed(f"job {name} exited with {code} after {seconds:.0f} s; {log_file}:\n{tail}")
    log.info("job %-14s %6.1f s", name, seconds)
    return {**json.loads(result_file.read_text()), "wall_s": seconds}


# -- sections --------------------------------------------------------------------------------


def compare_with_trl(
    model_path: str, settings: stats.BenchSettings, workdir: Path, tag: str = ""
) -> dict[str, Any]:
    """Ours and TRL alternated (ours first, then TRL first, ...); medians, ratios, breakdown."""
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    job = {"model_path": model_path, "settings": settings.as_dict()}
    for repeat in range(settings.repeats):
        order = ("ours", "trl") if repeat % 2 == 0 else ("trl", "ours")
        for kind in order:
            name = f"{kind}{tag}-{repeat}"
            runs[kind].append(run_job(name, {**job, "kind": kind}, workdir, settings.threads))
    ours, trl = stats.summarize_runs(runs["ours"]), stats.summarize_runs(runs["trl"])
    steps = stats.pooled(runs["ours"], "step_seconds")
    phases = stats.pooled(runs["ours"], "phase_seconds")
    old_passes = stats.pooled(runs["ours"], "old_logprob_passes")
    return {
        "ours": ours,
        "trl": trl,
        "step_time_ratio_vs_trl": stats.ratio(ours["step_cpu_s"], trl["step_cpu_s"]),
        "step_time_ratio_vs_trl_wall": stats.ratio(ours["step_time_s"], trl["step_time_s"]),
        "peak_rss_ratio_vs_trl": stats.ratio(ours["peak_rss_mb"], trl["peak_rss_mb"]),
        "rollout_tokens_per_s_ratio_vs_trl": stats.ratio(
            ours["rollout_tokens_per_cpu_s"], trl["rollout_tokens_per_cpu_s"]
        ),
        "rollout_tokens_per_s_ratio_vs_trl_wall": stats.ratio(
            ours["rollout_tokens_per_s"], trl["rollout_tokens_per_s"]
        ),
        "breakdown": stats.step_breakdown(steps, phases),
        "overhead_fraction": stats.overhead_fraction(steps, phases),
        "old_logprob_forward_passes_per_step": max(old_passes) if old_passes else None,
        "runs": runs,
    }


def width_sensitivity(
    paths: dict[str, str], settings: stats.BenchSettings, workdir: Path, widths: tuple[int, ...]
) -> dict[str, Any]:
    """The ours/TRL comparison again at other model widths (how the ratio depends on size)."""
    rows = {}
    for width in widths:
        result = compare_with_trl(
            paths[f"text-{width}"], settings.with_(hidden_size=width), workdir, tag=f"-w{width}"
        )
        rows[str(width)] = {k: v for k, v in result.items() if k != "runs"}
    return rows


def scaling(
    paths: dict[str, str], settings: stats.BenchSettings, workdir: Path, full_grid: bool
) -> dict[str, Any]:
    """Our step time over G x completion length (a cross in --quick, the 3x3 grid otherwise)."""
    groups, lengths = (4, 8, 16), (32, 64, 128)
    if full_grid:
        grid = [(g, t) for g in groups for t in lengths]
    else:
        grid = [(g, settings.max_new_tokens) for g in groups]
        grid += [(settings.group_size, t) for t in lengths if t != settings.max_new_tokens]
    job = {
        "kind": "scaling",
        "model_path": paths["text"],
        "grid": grid,
        "settings": settings.with_(
            steps=1 if not full_grid else max(2, settings.steps // 2)
        ).as_dict(),
    }
    return run_job("scaling", job, workdir, settings.threads)


def rollout_vs_naive(
    paths: dict[str, str],
    settings: stats.BenchSettings,
    workdir: Path,
    repeats: int,
    image_size: int,
) -> dict[str, Any]:
    """Shared-prefix sampling and log-probs over the naive paths, on the tiny Qwen2.5-VL."""
    job = {
        "kind": "rollout",
        "model_path": paths["vl"],
        "settings": settings.as_dict(),
        "repeats": repeats,
        "image_size": image_size,
    }
    result = run_job("rollout", job, workdir, settings.threads)
    t = {k: stats.median(v) for k, v in result["timings"].items()}
    return {
        **result,
        "medians_s": t,
        "rollout_speedup_vs_naive": stats.ratio(t["sample_naive_cpu"], t["sample_shared_cpu"]),
        "logprob_speedup_vs_naive": stats.ratio(t["logprobs_naive_cpu"], t["logprobs_shared_cpu"]),
        "rollout_speedup_vs_naive_wall": stats.ratio(t["sample_naive"], t["sample_shared"]),
    }


def reference_memory(
    paths: dict[str, str], settings: stats.BenchSettings, workdir: Path, control: bool
) -> dict[str, Any]:
    """Peak RSS with kl_coef 0.01 over kl_coef 0 (LoRA); `control` adds the full-weight pair.

    glibc's malloc raises its mmap threshold as large blocks are freed, and then keeps freed
    activation memory on the heap: peak RSS of the same run varied by ~10% between processes.
    The children here pin the threshold (`MALLOC_MMAP_THRESHOLD_`), so freed tensors go back to
    the OS and the peak follows live memory; runs then repeat to the MB. The full-weight pair
    (`control`) shows that a second copy of the weights does register.
    """
    small = settings.with_(prompts_per_step=1, max_new_tokens=16, warmup_steps=1, steps=1)
    pinned = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    variants = [("lora", True)] + ([("full", False)] if control else [])
    out: dict[str, Any] = {}
    for label, lora in variants:
        rss = {}
        for kl in (settings.kl_coef, 0.0):
            job = {
                "kind": "refmem",
                "model_path": paths["vl_wide"],
                "settings": small.with_(kl_coef=kl, lora=lora).as_dict(),
            }
            rss[kl] = run_job(f"refmem-{label}-kl{kl:g}", job, workdir, settings.threads, pinned)
        with_kl, without = rss[settings.kl_coef]["peak_rss_mb"], rss[0.0]["peak_rss_mb"]
        out[label] = {
            "peak_rss_mb_kl": with_kl,
            "peak_rss_mb_no_kl": without,
            "ratio": stats.ratio(with_kl, without),
        }
    out["ref_memory_ratio"] = out["lora"]["ratio"]
    return out


# -- report ----------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads_per_process": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "commit": commit + ("+dirty" if dirty else ""),
        "load_average_start": os.getloadavg(),
    }


def check_targets(report: dict[str, Any]) -> dict[str, Any]:
    checks = {}
    for name, (op, bound) in TARGETS.items():
        value = report.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            met = None
        else:
            met = value <= bound if op == "<=" else value > bound
        checks[name] = {"value": value, "target": f"{op} {bound}", "met": met}
    passes = report.get("old_logprob_forward_passes_per_step")
    checks["no_old_logprob_forward_at_num_iterations_1"] = {
        "value": passes,
        "target": "== 0",
        "met": None if passes is None else passes == 0,
    }
    return checks


def markdown_report(report: dict[str, Any]) -> str:
    """Every table of the report, as markdown."""
    parts = []
    machine = report["machine"]
    parts.append(
        f"Machine: {machine['processor']}, {machine['cpu_count']} cores, "
        f"{machine['threads_per_process']} torch thread(s) per process; torch "
        f"{machine['torch']}, transformers {machine['transformers']}, trl {machine['trl']}; "
        f"commit {machine['commit']}; load average {machine['load_average_start'][0]:.1f} at "
        f"start, {machine.get('load_average_end', [float('nan')])[0]:.1f} at end."
    )
    s = report["settings"]
    parts.append(
        f"Work per step: {s['prompts_per_step']} prompts x G={s['group_size']} x "
        f"{s['max_new_tokens']} tokens, kl_coef {s['kl_coef']}, lr {s['lr']}, "
        f"{s['steps']} timed steps after {s['warmup_steps']} warm-up, {s['repeats']} repeats; "
        f"tiny Qwen3 text, hidden {s['hidden_size']}, {s['num_layers']} layers."
    )
    cmp = report.get("comparison")
    if cmp:
        o, t = cmp["ours"], cmp["trl"]
        parts.append(
            "### Ours vs TRL (medians)\n"
            + stats.markdown_table(
                ["", "ours", "TRL", "ours/TRL"],
                [
                    [
                        "step CPU time (s)",
                        o["step_cpu_s"],
                        t["step_cpu_s"],
                        cmp["step_time_ratio_vs_trl"],
                    ],
                    [
                        "step wall time (s)",
                        o["step_time_s"],
                        t["step_time_s"],
                        cmp["step_time_ratio_vs_trl_wall"],
                    ],
                    [
                        "rollout tokens per CPU s",
                        o["rollout_tokens_per_cpu_s"],
                        t["rollout_tokens_per_cpu_s"],
                        cmp["rollout_tokens_per_s_ratio_vs_trl"],
                    ],
                    [
                        "rollout tokens per wall s",
                        o["rollout_tokens_per_s"],
                        t["rollout_tokens_per_s"],
                        cmp["rollout_tokens_per_s_ratio_vs_trl_wall"],
                    ],
                    [
                        "peak RSS (MB)",
                        o["peak_rss_mb"],
                        t["peak_rss_mb"],
                        cmp["peak_rss_ratio_vs_trl"],
                    ],
                    [
                        "RSS before training (MB)",
                        o["rss_before_train_mb"],
                        t["rss_before_train_mb"],
                        stats.ratio(o["rss_before_train_mb"], t["rss_before_train_mb"]),
                    ],
                    [
                        "wall step-time spread (max-min)/median",
                        o["step_time_spread"],
                        t["step_time_spread"],
                        "",
                    ],
                ],
            )
        )
        b = cmp["breakdown"]
        rows = [
            [phase, b[phase], stats.ratio(b[phase], b["step"])]
            for phase in (*stats.PHASES, "other")
        ]
        rows.append(["step", b["step"], 1.0])
        parts.append(
            "### Our step, by phase (median s)\n"
            + stats.markdown_table(["phase", "seconds", "share"], rows)
        )
    wd = report.get("widths")
    if wd:
        results = ([(s["hidden_size"], cmp)] if cmp else []) + [(int(w), r) for w, r in wd.items()]
        rows = [
            [
                width,
                r["ours"]["step_cpu_s"],
                r["trl"]["step_cpu_s"],
                r["step_time_ratio_vs_trl"],
                r["step_time_ratio_vs_trl_wall"],
                r["rollout_tokens_per_s_ratio_vs_trl"],
            ]
            for width, r in sorted(results, key=lambda item: item[0])
        ]
        parts.append(
            "### Ratio against model width\n"
            + stats.markdown_table(
                [
                    "hidden",
                    "ours step CPU (s)",
                    "TRL step CPU (s)",
                    "step ours/TRL (CPU)",
                    "step ours/TRL (wall)",
                    "rollout tok/s ours/TRL (CPU)",
                ],
                rows,
            )
        )
    sc = report.get("scaling")
    if sc:
        rows = [
            [
                r["group_size"],
                r["max_new_tokens"],
                r["step_cpu_s"],
                r["step_time_s"],
                r["breakdown"]["generation"],
                r["breakdown"]["ref_logprobs"] + r["breakdown"]["policy_forward_backward"],
                r["rollout_tokens_per_s"],
            ]
            for r in sc["rows"]
        ]
        parts.append(
            "### Scaling (ours)\n"
            + stats.markdown_table(
                [
                    "G",
                    "max tokens",
                    "step CPU (s)",
                    "step wall (s)",
                    "generation (s)",
                    "log-prob + fwd/bwd (s)",
                    "rollout tokens/s",
                ],
                rows,
            )
        )
    ro = report.get("rollout")
    if ro:
        m = ro["medians_s"]
        parts.append(
            f"### Shared-prefix rollout vs naive (tiny Qwen2.5-VL, {ro['prompt_tokens']} prompt "
            f"tokens incl. {ro['image_tokens']} image tokens)\n"
            + stats.markdown_table(
                ["CPU seconds", "shared prefix", "naive", "speed-up"],
                [
                    [
                        "sampling",
                        m["sample_shared_cpu"],
                        m["sample_naive_cpu"],
                        ro["rollout_speedup_vs_naive"],
                    ],
                    [
                        "log-prob pass",
                        m["logprobs_shared_cpu"],
                        m["logprobs_naive_cpu"],
                        ro["logprob_speedup_vs_naive"],
                    ],
                ],
            )
        )
    rm = report.get("ref_memory")
    if rm:
        rows = [
            [label, v["peak_rss_mb_kl"], v["peak_rss_mb_no_kl"], v["ratio"]]
            for label, v in rm.items()
            if isinstance(v, dict)
        ]
        parts.append(
            "### Reference memory (tiny Qwen2.5-VL, hidden 1024)\n"
            + stats.markdown_table(
                ["training", "peak RSS kl 0.01 (MB)", "peak RSS kl 0 (MB)", "ratio"], rows
            )
        )
    targets = report["targets"]
    parts.append(
        "### Targets\n"
        + stats.markdown_table(
            ["figure", "value", "target", "met"],
            [
                [
                    k,
                    v["value"] if v["value"] is not None else "n/a",
                    v["target"],
                    {True: "yes", False: "NO", None: "n/a"}[v["met"]],
                ]
                for k, v in targets.items()
            ],
        )
    )
    if report.get("errors"):
        parts.append("### Errors\n" + "\n".join(f"- {e}" for e in report["errors"]))
    return "\n\n".join(parts) + "\n"


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
    parser.add_argument("--quick", action="store_true", help="fewer steps/repeats (< 5 min)")
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
        help="extra model widths for the ours/TRL ratio (e.g. 128,512); auto: 128, none in --quick",
    )
    parser.add_argument("--lora", action="store_true", help="LoRA in both trainers")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated subset of compare,widths,scaling,rollout,refmem",
    )
    return parser.parse_args(argv)


def default_workdir() -> Path:
    from safegrpo_pl.files import default_cache_dir

    return default_cache_dir() / "bench"


def parse_widths(text: str, *, quick: bool, headline: int) -> tuple[int, ...]:
    """The extra widths of `--widths`: "auto" is 128 (none with --quick); the headline is skipped."""
    if text == "auto":
        return () if quick else tuple(w for w in (128,) if w != headline)
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError as err:
        raise SystemExit(
            f"--widths {text!r}: expected comma-separated integers, e.g. 128,512"
        ) from err
    return tuple(w for w in widths if w != headline)


def settings_from(args: argparse.Namespace) -> stats.BenchSettings:
    settings = stats.QUICK if args.quick else stats.BenchSettings()
    changes = {
        k: v
        for k, v in (("repeats", args.repeats), ("steps", args.steps), ("threads", args.threads))
        if v is not None
    }
    if args.lora:
        changes["lora"] = True
    return settings.with_(**changes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = settings_from(args)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from {list(SECTIONS)}")
    workdir = (args.workdir or default_workdir()).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": [Path(sys.executable).name, *sys.argv],
        "quick": args.quick,
        "machine": machine_info(settings.threads),
        "settings": settings.as_dict(),
        "fairness": FAIRNESS,
        "errors": [],
    }
    widths = parse_widths(args.widths, quick=args.quick, headline=settings.hidden_size)
    paths = build_models(workdir, settings, widths)
    log.info("models ready in %.0f s: %s", time.perf_counter() - started, paths)
    steps: list[tuple[str, Any]] = [
        ("compare", lambda: compare_with_trl(paths["text"], settings, workdir)),
        ("widths", lambda: width_sensitivity(paths, settings, workdir, widths)),
        ("scaling", lambda: scaling(paths, settings, workdir, full_grid=not args.quick)),
        (
            "rollout",
            lambda: rollout_vs_naive(
                paths, settings, workdir, repeats=2 if args.quick else 5, image_size=224
            ),
        ),
        ("refmem", lambda: reference_memory(paths, settings, workdir, control=not args.quick)),
    ]
    for name, section in steps:
        if name not in sections:
            continue
        try:
            result = section()
        except Exception as err:  # one broken section must not lose the others' results
            log.exception("section %s failed", name)
            report["errors"].append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        key = {"compare": "comparison", "refmem": "ref_memory"}.get(name, name)
        if name == "widths" and not widths:
            continue
        report[key] = result
    comparison, rollout = report.get("comparison", {}), report.get("rollout", {})
    report.update(
        {
            "step_time_ratio_vs_trl": comparison.get("step_time_ratio_vs_trl"),
            "peak_rss_ratio_vs_trl": comparison.get("peak_rss_ratio_vs_trl"),
            "rollout_tokens_per_s_ratio_vs_trl": comparison.get(
                "rollout_tokens_per_s_ratio_vs_trl"
            ),
            "overhead_fraction": comparison.get("overhead_fraction"),
            "old_logprob_forward_passes_per_step": comparison.get(
                "old_logprob_forward_passes_per_step"
            ),
            "ref_memory_ratio": report.get("ref_memory", {}).get("ref_memory_ratio"),
            "rollout_speedup_vs_naive": rollout.get("rollout_speedup_vs_naive"),
            "logprob_speedup_vs_naive": rollout.get("logprob_speedup_vs_naive"),
        }
    )
    report["targets"] = check_targets(report)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["elapsed_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_json_safe(report), indent=1))
    tables = markdown_report(report)
    args.out.with_suffix(".md").write_text(tables)
    sys.stdout.write(tables)
    log.info(
        "wrote %s and %s in %.0f s", args.out, args.out.with_suffix(".md"), report["elapsed_s"]
    )
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
