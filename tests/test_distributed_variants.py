"""The variants' rank helpers on two real gloo processes against one process: REINFORCE++'s
whitening over every rank's completions, and the optional statistics summed over ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import run_in_own_group
from variants_ranks import GROUP, global_batch, stats

from safegrpo_pl.rl.grpo import reinforce_plus_plus_baseline_advantages

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_ranks_whiten_over_the_whole_batch_and_sum_the_new_statistics(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "tests" / "variants_ranks.py"), str(tmp_path)]
    try:
        code, output = run_in_own_group(command, env, timeout=120)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"two ranks hung and were killed:\n{hung.output[-3000:]}")
    assert code == 0, output[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    rewards, lengths = global_batch()
    one_process = reinforce_plus_plus_baseline_advantages(rewards, lengths, GROUP)
    both = torch.cat([r["advantages"] for r in ranks])
    assert torch.equal(both, one_process), "each rank must whiten over every rank's tokens"
    merged = stats(0).merge(stats(1)).as_dict()
    for rank in ranks:
        for name in ("entropy", "sampler_kl", "kl", "policy_loss"):
            assert torch.equal(rank["stats"][name], merged[name]), f"{name} not summed over ranks"
