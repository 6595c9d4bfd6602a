"""`scripts/gpu_check.py` in its CPU mode: the GPU check's code runs at tiny sizes, so it cannot
rot before a GPU is lent (its GPU mode has never run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import run_in_own_group

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode_reports_every_run_within_25_percent_of_plan(tmp_path):
    out = tmp_path / "report.json"
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    try:
        status, output = run_in_own_group(command, env, timeout=900)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"gpu_check.py --cpu hung for 900 s and was killed:\n{hung.output[-4000:]}")
    assert status == 0, output[-6000:]
    runs = json.loads(out.read_text())["runs"]
    assert runs.keys() == {"lora", "full", "qlora", "fsdp2-one-device"}
    assert "needs a GPU" in runs["qlora"]["skipped"]
    for name in ("lora", "full", "fsdp2-one-device"):
        row = runs[name]
        assert set(row["phases_within_25_percent"]) == {"sampling", "log-probs", "training"}
        assert all(row["phases_within_25_percent"].values()), (name, row["phases_mib"])
        assert row["decode_tokens_per_s"] > 0 and row["decode"]["tokens"] > 0
    # float32: the training forward and the old pass agree to rounding; FSDP2 computes in bf16
    assert runs["lora"]["importance_ratio"]["max_abs_deviation"] < 1e-5
    assert runs["full"]["importance_ratio"]["max_abs_deviation"] < 1e-5
    assert runs["fsdp2-one-device"]["importance_ratio"]["max_abs_deviation"] < 3e-2
