"""The benchmark harness's pieces (`scripts/bench.py` and its helpers), not the benchmark.

Timing arithmetic, the step breakdown, target checks, JSON safety, the TRL reward adapter and
the report rendering; all on hand-made numbers, in milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import _bench_jobs as jobs  # noqa: E402
import _bench_stats as stats  # noqa: E402


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_script", SCRIPTS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


# -- timing arithmetic -------------------------------------------------------------------------


def test_step_intervals_drop_warmup_and_difference_end_times() -> None:
    # ends 10, 13, 15, 20 with one warm-up step: steps 1..3 cost 13-10, 15-13, 20-15 = 3, 2, 5
    assert stats.step_intervals([10.0, 13.0, 15.0, 20.0], warmup_steps=1) == [3.0, 2.0, 5.0], (
        "step k must cost end[k] - end[k-1], with the warm-up steps dropped"
    )


def test_step_intervals_refuse_zero_warmup() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        stats.step_intervals([1.0, 2.0], warmup_steps=0)


def test_step_intervals_refuse_runs_without_a_timed_step() -> None:
    with pytest.raises(ValueError, match="no timed step"):
        stats.step_intervals([1.0], warmup_steps=1)


def test_breakdown_other_is_step_minus_the_timed_phases() -> None:
    steps = [2.0, 4.0]
    phases = [
        {"generation": 1.0, "policy_forward_backward": 0.5},  # other = 2 - 1.5 = 0.5
        {"generation": 2.0, "policy_forward_backward": 1.0, "reward": 0.5},  # other = 0.5
    ]
    breakdown = stats.step_breakdown(steps, phases)
    assert breakdown["other"] == pytest.approx(0.5, abs=1e-12), "other must be step - phases"
    # generation median of 1 and 2 = 1.5; a missing phase counts 0 s: reward median(0, 0.5)
    assert breakdown["generation"] == pytest.approx(1.5, abs=1e-12)
    assert breakdown["reward"] == pytest.approx(0.25, abs=1e-12)
    assert breakdown["old_logprobs"] == 0.0, "a phase never timed must read 0 s, not be missing"
    assert breakdown["step"] == pytest.approx(3.0, abs=1e-12)


def test_breakdown_refuses_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="same steps"):
        stats.step_breakdown([1.0, 2.0], [{"generation": 1.0}])


def test_overhead_counts_reward_optimizer_and_untimed_time() -> None:
    # step 2.0 s, compute = generation 1.0 + ref 0.2 + policy 0.6 = 1.8: overhead 0.2 / 2 = 0.1
    phases = [
        {
            "generation": 1.0,
            "ref_logprobs": 0.2,
            "policy_forward_backward": 0.6,
            "reward": 0.05,
            "optimizer": 0.05,
        }
    ]
    assert stats.overhead_fraction([2.0], phases) == pytest.approx(0.1, abs=1e-12), (
        "overhead must be the share of the step outside generation and forward/backward passes"
    )


def test_ratio_is_nan_for_a_zero_or_nan_denominator() -> None:
    assert math.isnan(stats.ratio(1.0, 0.0)), "a zero denominator must give NaN, not raise"
    assert math.isnan(stats.ratio(1.0, float("nan")))
    assert stats.ratio(1.0, 4.0) == 0.25


def test_median_of_nothing_is_nan() -> None:
    assert math.isnan(stats.median([])), "a missing measurement must show as NaN"


def test_summarize_runs_pools_steps_and_takes_rss_per_process() -> None:
    runs = [
        {
            "step_seconds": [1.0, 3.0],
            "step_cpu_seconds": [1.0, 1.5],
            "generation_seconds": [0.5, 1.0],
            "generation_cpu_seconds": [0.5, 0.5],
            "completion_tokens": [100, 100],
            "peak_rss_mb": 500.0,
            "rss_before_train_mb": 300.0,
        },
        {
            "step_seconds": [2.0],
            "step_cpu_seconds": [2.0],
            "generation_cpu_seconds": [1.0],
            "generation_seconds": [0.25],
            "completion_tokens": [100],
            "peak_rss_mb": 700.0,
            "rss_before_train_mb": 320.0,
        },
    ]
    summary = stats.summarize_runs(runs)
    assert summary["step_time_s"] == 2.0, "step time: median of the pooled steps 1, 3, 2"
    assert summary["step_cpu_s"] == 1.5, "CPU step time: median of the pooled 1, 1.5, 2"
    # tokens per wall s per step: 200, 100, 400 -> median 200
    assert summary["rollout_tokens_per_s"] == pytest.approx(200.0, abs=1e-9)
    # tokens per CPU s per step: 200, 200, 100 -> median 200
    assert summary["rollout_tokens_per_cpu_s"] == pytest.approx(200.0, abs=1e-9)
    assert summary["peak_rss_mb"] == 600.0, "peak RSS: median over processes (500, 700)"
    assert summary["step_time_spread"] == pytest.approx(1.0, abs=1e-12)  # (3 - 1) / 2


def test_settings_with_changes_only_the_named_fields() -> None:
    changed = stats.BenchSettings().with_(group_size=16)
    assert changed.group_size == 16 and changed.max_new_tokens == 64
    assert changed.completions_per_step == 4 * 16


# -- tables and the report ------------------------------------------------------------------


def test_markdown_table_right_aligns_numeric_columns() -> None:
    table = stats.markdown_table(["name", "s"], [["a", 1.23456], ["b", float("nan")]])
    assert table.splitlines() == [
        "| name | s |",
        "| --- | ---: |",
        "| a | 1.23 |",
        "| b | nan |",
    ], "numbers to 3 significant figures, numeric columns right-aligned"


def test_markdown_table_refuses_a_short_row() -> None:
    with pytest.raises(ValueError, match="columns"):
        stats.markdown_table(["a", "b"], [[1]])


def test_targets_mark_a_miss_and_a_missing_figure() -> None:
    report = {
        "step_time_ratio_vs_trl": 0.7,
        "peak_rss_ratio_vs_trl": 0.9,
        "overhead_fraction": None,
        "ref_memory_ratio": 1.0,
        "rollout_speedup_vs_naive": float("nan"),
        "old_logprob_forward_passes_per_step": 0,
    }
    checks = bench.check_targets(report)
    assert checks["step_time_ratio_vs_trl"]["met"] is False, "0.7 > 0.5 must be a miss"
    assert checks["peak_rss_ratio_vs_trl"]["met"] is True
    assert checks["overhead_fraction"]["met"] is None, "a missing figure is n/a, not a pass"
    assert checks["rollout_speedup_vs_naive"]["met"] is None, "NaN is n/a, not a pass"
    assert checks["no_old_logprob_forward_at_num_iterations_1"]["met"] is True


def test_json_safe_turns_nan_and_inf_into_null() -> None:
    value = {"a": float("nan"), "b": [1.0, float("inf")], "c": (2,)}
    assert json.loads(json.dumps(bench._json_safe(value), allow_nan=False)) == {
        "a": None,
        "b": [1.0, None],
        "c": [2],
    }


def test_quick_flag_and_overrides_reach_the_settings() -> None:
    args = ["--quick", "--steps", "5", "--lora", "--decode", "compiled"]
    settings = bench.settings_from(bench.parse_args(args))
    assert settings.repeats == stats.QUICK.repeats, "--quick must use the quick repeats"
    assert settings.steps == 5, "--steps must override the quick default"
    assert settings.lora is True
    assert settings.decode == "compiled", "--decode must reach our sampling settings"
    assert bench.settings_from(bench.parse_args(["--quick"])).decode == "growing"


def _fake_report() -> dict[str, Any]:
    ours = {
        "step_time_s": 1.0,
        "step_cpu_s": 1.0,
        "rollout_tokens_per_s": 2000.0,
        "rollout_tokens_per_cpu_s": 2000.0,
        "peak_rss_mb": 600.0,
        "rss_before_train_mb": 400.0,
        "step_time_spread": 0.1,
    }
    trl = {**ours, "step_time_s": 3.0, "step_cpu_s": 3.0, "peak_rss_mb": 1000.0}
    breakdown = {phase: 0.1 for phase in stats.PHASES} | {"other": 0.4, "step": 1.0}
    report: dict[str, Any] = {
        "machine": {
            "processor": "x86_64",
            "cpu_count": 2,
            "threads_per_process": 1,
            "torch": "t",
            "transformers": "tf",
            "trl": "trl",
            "commit": "abc",
            "load_average_start": (1.0, 1.0, 1.0),
            "load_average_end": (1.0, 1.0, 1.0),
        },
        "settings": stats.BenchSettings().as_dict(),
        "comparison": {
            "ours": ours,
            "trl": trl,
            "step_time_ratio_vs_trl": 1 / 3,
            "step_time_ratio_vs_trl_wall": 1 / 3,
            "peak_rss_ratio_vs_trl": 0.6,
            "rollout_tokens_per_s_ratio_vs_trl": 1.0,
            "rollout_tokens_per_s_ratio_vs_trl_wall": 1.0,
            "breakdown": breakdown,
        },
        "step_time_ratio_vs_trl": 1 / 3,
        "errors": [],
    }
    report["targets"] = bench.check_targets(report)
    return report


def test_report_renders_the_comparison_breakdown_and_targets() -> None:
    text = bench.markdown_report(_fake_report())
    assert "### Ours vs TRL (medians)" in text
    assert "| step CPU time (s) | 1 | 3 | 0.333 |" in text, "the ratio row must show ours/TRL"
    assert "### Our step, by phase (median s)" in text
    assert "| step_time_ratio_vs_trl | 0.333 | <= 0.5 | yes |" in text


def test_report_shows_the_matrix_floor_when_a_step_was_profiled() -> None:
    report = _fake_report()
    assert "matrix floor" not in bench.markdown_report(report), (
        "a report without a profiled step (from before it) must render without that table"
    )
    comparison = report["comparison"]
    comparison["ours"]["kernels"] = {"matrix_s": 0.6, "profiled_s": 0.9}
    comparison["trl"]["kernels"] = {"matrix_s": 1.5, "profiled_s": 2.7}
    comparison["matrix_floor_ratio_vs_trl"] = 0.2
    text = bench.markdown_report(report)
    assert "| matrix products and attention kernels | 0.6 | 1.5 | 0.4 |" in text
    assert "| every op and region profiled | 0.9 | 2.7 | 0.333 |" in text
    assert "| floor: our matrix products / TRL's step CPU time |  |  | 0.2 |" in text


def test_kernel_seconds_count_matrix_kernels_apart_from_the_rest() -> None:
    own = {
        "aten::mm": 0.5,
        "aten::bmm": 0.1,
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward": 0.2,
        "aten::mul": 0.3,  # elementwise: overhead, not the floor
        "aten::linear": 0.05,  # a dispatcher: its own time is not the matmul's
        "## Call CompiledFxGraph abc": 0.15,
    }
    assert stats.kernel_seconds(own) == pytest.approx({"matrix_s": 0.8, "profiled_s": 1.3})


def test_kernel_medians_skip_runs_without_a_profile() -> None:
    runs = [
        {"kernel_seconds": {"matrix_s": 1.0, "profiled_s": 2.0}},
        {"kernel_seconds": {"matrix_s": 3.0, "profiled_s": 4.0}},
        {"kernel_seconds": {}},
    ]
    assert stats.kernel_medians(runs) == {"matrix_s": 2.0, "profiled_s": 3.0}
    assert all(math.isnan(v) for v in stats.kernel_medians([{}]).values())


# -- the child jobs' small pieces -------------------------------------------------------------


def test_trl_reward_adapter_scores_like_our_reward() -> None:
    from safegrpo_pl.core.prompts import REFUSAL_ANSWERS, format_response

    good = format_response(
        visual="unsafe", text="safe", combined="unsafe", answer=REFUSAL_ANSWERS[0]
    )
    # Every tag right (0.5 + 0.25 + 0.25 = 1), refusal on an unsafe pair (1): R = 0.5*1 + 0.5*1.
    scores = jobs.trl_safety_reward(
        completions=[good, "no format at all", [{"role": "assistant", "content": good}]],
        image_tag=["unsafe"] * 3,
        text_tag=["safe"] * 3,
        combine_tag=["unsafe"] * 3,
        prompts=["ignored"] * 3,
    )
    assert scores == [1.0, 0.0, 1.0], "TRL's reward must equal safety_reward, messages unwrapped"


def test_every_section_job_has_a_runner() -> None:
    assert set(jobs.JOBS) == {"ours", "trl", "scaling", "rollout", "refmem", "mfu"}, (
        "bench.py starts these job kinds; each needs a runner in _bench_jobs.JOBS"
    )


def test_widths_auto_is_128_in_a_full_run_and_none_in_quick() -> None:
    assert bench.parse_widths("auto", quick=False, headline=256) == (128,)
    assert bench.parse_widths("auto", quick=True, headline=256) == ()
    assert bench.parse_widths("128,256,512", quick=False, headline=256) == (128, 512), (
        "the headline width is measured by the comparison itself, not again"
    )


# -- reading what the module logs -------------------------------------------------------------


def test_logged_phases_strip_the_prefix_and_leave_out_the_total() -> None:
    import torch

    metrics = {
        "time/generation": torch.tensor(0.5),
        "time/ref_logprobs": 0.25,
        "time/step_total": torch.tensor(0.75),
        "train/reward": torch.tensor(1.0),
    }
    assert stats.logged_phases(metrics) == {"generation": 0.5, "ref_logprobs": 0.25}, (
        "phases are the time/* metrics minus time/step_total (a sum, not a phase), as floats"
    )


def test_cpu_seconds_estimate_scales_by_the_steps_cpu_share() -> None:
    # step 1: 2 s wall, 1 s CPU -> a 0.5 s phase cost 0.25 CPU s; step 2: all on a core
    assert stats.cpu_seconds_estimate([0.5, 0.4], [2.0, 1.0], [1.0, 1.0]) == [0.25, 0.4]
    with pytest.raises(ValueError, match="same steps"):
        stats.cpu_seconds_estimate([0.5], [2.0, 1.0], [1.0, 1.0])


def test_step_recorder_reads_the_phases_each_step_logged() -> None:
    """Through a real `Trainer.fit`: the callback sees each step's own logged seconds."""
    import _bench_ours as ours
    import torch
    from lightning import LightningModule, Trainer

    class Logs(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            seconds = {"time/generation": float(batch_idx + 1), "time/step_total": 9.0}
            self.log_dict(seconds, on_step=True, on_epoch=False, batch_size=1)
            return (self.weight - 1.0) ** 2

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    recorder = ours.StepRecorder()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(Logs(), train_dataloaders=torch.utils.data.DataLoader(range(3), batch_size=1))
    assert recorder.phases == [{"generation": 1.0}, {"generation": 2.0}, {"generation": 3.0}]
    assert len(recorder.ends) == len(recorder.cpu_ends) == 3
    assert recorder.ends == sorted(recorder.ends), "end times must follow the steps"


def test_bench_api_has_every_name_the_scripts_take_from_the_library() -> None:
    import _bench_api as api

    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert not missing, f"scripts/_bench_api.py lost {missing}: fix its imports"


# -- the whole benchmark, at the smallest size ---------------------------------------------


def _nulls(value: Any, where: str = "") -> list[str]:
    """Where `value` (a parsed JSON document) holds a null."""
    if value is None:
        return [where or "/"]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _nulls(v, f"{where}/{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _nulls(v, f"{where}[{i}]")]
    return []


def test_nulls_finds_every_missing_figure() -> None:
    assert _nulls({"a": [1, None], "b": {"c": None}, "d": 0}) == ["/a[1]", "/b/c"]


@pytest.mark.slow
def test_smoke_bench_runs_every_job_and_writes_no_null(tmp_path: Path) -> None:
    """`scripts/bench.py --smoke` as a user types it: every section, every job kind, TRL too."""
    pytest.importorskip("trl", reason="the bench compares with TRL: pip install -e '.[bench]'")
    import os

    from processes import run_in_own_group

    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPTS / "bench.py"), "--smoke", "--out", str(out)]
    command += ["--workdir", str(tmp_path / "work")]
    code, output = run_in_own_group(command, dict(os.environ), timeout=600)
    assert code == 0, f"bench --smoke exited {code}:\n{output[-3000:]}"
    report = json.loads(out.read_text())
    assert report["errors"] == [], report["errors"]
    assert _nulls(report) == [], f"bench.json has nulls (a job lost its figure): {_nulls(report)}"
    logs = {p.stem.split("-")[0] for p in (tmp_path / "work" / "logs").glob("*.log")}
    assert logs == set(jobs.JOBS), f"job logs {sorted(logs)}; every kind in JOBS must run"
    assert out.with_suffix(".md").read_text().startswith("Machine:")
    comparison = report["comparison"]
    for side in ("ours", "trl"):
        kernels = comparison[side]["kernels"]
        assert 0 < kernels["matrix_s"] < kernels["profiled_s"], (
            f"{side}'s profiled step must record matrix kernels and other ops: {kernels}"
        )
    assert "(matrix floor)" in out.with_suffix(".md").read_text()
