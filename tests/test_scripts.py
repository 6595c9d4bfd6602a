"""Every script in `scripts/` runs as a user types it, at its smallest size, exits 0 and writes
its output. A new script needs a row here (or a test elsewhere, named in `TESTED_ELSEWHERE`)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from processes import run_in_own_group

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

# script -> the test that runs it as a user does (too slow or too specific to repeat here)
TESTED_ELSEWHERE = {
    "bench.py": ("test_bench.py", "test_smoke_bench_runs_every_job_and_writes_no_null"),
    "plan_check.py": (
        "test_plan.py",
        "test_estimate_is_within_25_percent_of_the_measured_peak_of_a_fit_step",
    ),
    "make_typographic.py": ("test_data.py", "test_make_typographic_writes_a_loadable_dataset"),
    "gpu_check.py": (
        "test_gpu_check.py",
        "test_gpu_check_cpu_mode_reports_every_run_within_25_percent_of_plan",
    ),
    "train_refusal_model.py": (
        "test_judge_agreement.py",
        "test_the_training_script_smoke_run_is_deterministic_and_its_file_loads",
    ),
    # It downloads the pinned release (no network here); its conversion is what is tested.
    "human_labels.py": (
        "test_judge_agreement.py",
        "test_convert_maps_the_authors_labels_and_leaves_out_the_unlabelled",
    ),
}
# script -> what its smoke run prints (its output is stdout)
SMOKE_OUTPUT = {
    "demo_budget.py": "| demo-typographic | 168 | 36 |",
    "demo_fit.py": "demo-typographic",
    "probe_typographic.py": "held-out",
    "judge_agreement.py": "seconds for 10,000 answers",
    "plan_comments.py": "",
    "head_cost.py": "demo",
    "decode_speed.py": "smoke: 16 completion tokens per rollout",
    "readme_blocks.py": "README blocks up to date",
}


def _run(args: list[str], timeout: float = 300) -> str:
    code, output = run_in_own_group([sys.executable, *args], dict(os.environ), timeout)
    assert code == 0, f"{' '.join(args)} exited {code}:\n{output[-3000:]}"
    return output


def test_every_script_has_a_smoke_test() -> None:
    scripts = {p.name for p in SCRIPTS.glob("*.py") if not p.name.startswith("_")}
    untested = scripts - set(SMOKE_OUTPUT) - set(TESTED_ELSEWHERE)
    assert not untested, f"{sorted(untested)}: add a smoke run to tests/test_scripts.py"
    for script, (test_file, test_name) in TESTED_ELSEWHERE.items():
        text = (ROOT / "tests" / test_file).read_text()
        assert re.search(rf"def {test_name}\(", text), f"{script}: {test_file}::{test_name} gone"


@pytest.mark.slow
def test_demo_budget_prints_each_source_of_the_demo_config() -> None:
    printed = _run([str(SCRIPTS / "demo_budget.py"), "--config", str(ROOT / "configs/tiny.yaml")])
    assert SMOKE_OUTPUT["demo_budget.py"] in printed, printed
    assert "| demo-picture | 64 | 4 |" in printed, printed


@pytest.mark.slow
def test_demo_fit_prints_each_split_of_a_model(tmp_path: Path, tiny_qwen25vl_path: Path) -> None:
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({"data": {"demo": {"num_train": 16, "num_val": 16}}}))
    script = str(SCRIPTS / "demo_fit.py")
    printed = _run([script, str(tiny_qwen25vl_path), "--config", str(config), "--limit", "1"])
    for split in ("train", "validation", "test"):
        assert re.search(rf"^\s+{split}\s+demo-picture", printed, re.M), printed


@pytest.mark.slow
def test_probe_typographic_smoke_runs_every_mode() -> None:
    printed = _run([str(SCRIPTS / "probe_typographic.py"), "--smoke"])
    assert "two drawings of one phrase" in printed, "--drawings mode did not run"
    assert "between-phrase share" in printed, "--spread mode did not run"
    assert re.search(r"^\| 0 \| \d+ / \d+ \|", printed, re.M), "the probe's row is missing"


def test_judge_agreement_smoke_prints_every_rule_judge_and_the_timing() -> None:
    printed = _run([str(SCRIPTS / "judge_agreement.py"), "--smoke"])
    assert SMOKE_OUTPUT["judge_agreement.py"] in printed
    assert "`keyword`" in printed and "`refusal-rules`" in printed


def test_plan_comments_check_finds_the_configs_up_to_date() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    code, output = run_in_own_group(
        [sys.executable, str(SCRIPTS / "plan_comments.py"), "--check"], env, 300
    )
    assert code == 0, output[-2000:]


@pytest.mark.slow
def test_head_cost_measures_the_demo_case(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    args = ["--cases", "demo", "--steps", "2", "--reps", "1", "--json", str(out)]
    printed = _run([str(SCRIPTS / "head_cost.py"), *args], timeout=600)
    assert SMOKE_OUTPUT["head_cost.py"] in printed
    assert json.loads(out.read_text()), "no rows written"


@pytest.mark.slow
def test_decode_speed_smoke_times_each_mode_and_compares_its_tokens(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    args = ["--smoke", "--modes", "growing,static", "--json", str(out)]
    printed = _run([str(SCRIPTS / "decode_speed.py"), *args])
    assert SMOKE_OUTPUT["decode_speed.py"] in printed, printed
    (case,) = json.loads(out.read_text())
    assert set(case["modes"]) == {"growing", "static"}, "--modes must pick the modes timed"
    for mode, row in case["modes"].items():
        assert row["tokens_per_s"] > 0, mode
        assert row["same_tokens_as_growing"] == {"sampled": True, "greedy": True}, mode


@pytest.mark.slow
def test_readme_blocks_are_what_the_commands_wrote() -> None:
    """The README's generated blocks (demo and evaluation reports, bench tables) match their
    sources, and the evaluation sample matches what `evaluate` writes now."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    code, output = run_in_own_group(
        [sys.executable, str(SCRIPTS / "readme_blocks.py"), "--check"], env, 300
    )
    assert code == 0, output[-3000:]
    assert SMOKE_OUTPUT["readme_blocks.py"] in output
