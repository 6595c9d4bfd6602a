"""The sections of the benchmark (`scripts/bench.py`), each measured in fresh child processes
(`scripts/_bench_jobs.py`), so that every peak resident memory belongs to one job alone.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _bench_stats as stats

log = logging.getLogger("bench")
SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent


# -- models ----------------------------------------------------------------------------------


def build_models(
    workdir: Path, settings: stats.BenchSettings, extra_widths: tuple[int, ...] = ()
) -> dict[str, str]:
    """Build (or reuse) the tiny models of every section under `workdir/models`.

    Keys: "text" (the comparison), "text-W" per extra width W, "vl" (rollout vs naive),
    "vl_wide" (reference memory), "text_mfu" (train-pass efficiency).
    """
    import _bench_api as api

    specs = {
        "text": api.TinyModelSpec(
            arch="qwen3_text",
            hidden_size=settings.hidden_size,
            num_layers=settings.num_layers,
            seed=settings.seed,
        ),
        **{
            f"text-{width}": api.TinyModelSpec(
                arch="qwen3_text",
                hidden_size=width,
                num_layers=settings.num_layers,
                seed=settings.seed,
            )
            for width in extra_widths
        },
        "vl": api.TinyModelSpec(
            arch="qwen2_5_vl",
            hidden_size=settings.hidden_size,
            num_layers=settings.num_layers,
            vision_hidden_size=64,
            seed=settings.seed,
        ),
        # Wide enough for matmuls to dominate the train pass (train-pass efficiency).
        "text_mfu": api.TinyModelSpec(
            arch="qwen3_text",
            hidden_size=settings.wide_size,
            num_layers=4,
            num_heads=8,
            seed=settings.seed,
        ),
        # Wide enough that one more copy of the weights (~150 MB) would show in peak RSS.
        "vl_wide": api.TinyModelSpec(
            arch="qwen2_5_vl",
            hidden_size=settings.wide_size,
            num_layers=4,
            num_heads=8,
            seed=settings.seed,
        ),
    }
    corpus = api.demo_corpus()
    paths = {}
    for name, spec in specs.items():
        folder = workdir / "models" / name
        marker = folder / "tiny_spec.json"
        wanted = json.dumps({**spec.__dict__, "corpus": len(corpus)}, sort_keys=True)
        stamp = folder / "bench_stamp.json"
        if not (marker.exists() and stamp.exists() and stamp.read_text() == wanted):
            api.build_tiny_model(folder, corpus=corpus, spec=spec)
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
        "matrix_floor_ratio_vs_trl": stats.ratio(ours["kernels"]["matrix_s"], trl["step_cpu_s"]),
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
    groups, lengths = settings.scaling_groups, settings.scaling_lengths
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
    out["hidden_size"] = settings.wide_size
    return out


def train_pass_efficiency(
    paths: dict[str, str], settings: stats.BenchSettings, workdir: Path, repeats: int
) -> dict[str, Any]:
    """The policy forward+backward's FLOP/s against the matmul peak and a plain transformers
    pass on the same model and tokens, measured in one process (`scripts/_bench_mfu.py`)."""
    job = {"kind": "mfu", "model_path": paths["text_mfu"], "settings": settings.as_dict()}
    result = run_job("mfu", {**job, "repeats": repeats}, workdir, settings.threads)
    return {**result, "hidden_size": settings.wide_size}
