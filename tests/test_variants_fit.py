"""Each GRPO variant of docs/method.md section 4.15 runs end to end: a 2-step `fit` of the demo
through the real command line, in this process (the imports are paid once for all variants)."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import yaml

from safegrpo_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY_FIT = (
    "fit",
    "--config",
    str(ROOT / "configs" / "tiny.yaml"),
    "--model.warmup.steps",
    "2",
    "--model.group_size",
    "2",
    "--model.sampling.max_new_tokens",
    "6",
    "--data.batch_size",
    "4",
    "--data.eval_batch_size",
    "4",
    "--data.demo.num_train",
    "8",
    "--data.demo.num_val",
    "4",
    "--data.demo.num_test",
    "4",
    "--trainer.max_steps",
    "2",
    "--trainer.val_check_interval",
    "100",
    "--trainer.enable_progress_bar",
    "false",
)

# variant -> (its settings, a figure it must log beyond the default ones)
VARIANTS = {
    "gspo": (
        {"policy_loss": "gspo", "aggregation": "seq-mean-token-mean"},
        "train/clip_frac",
    ),
    "cispo": ({"policy_loss": "cispo", "clip_eps_low": "0.9"}, "train/clip_frac"),
    "rloo": ({"advantage_estimator": "rloo"}, "train/loss"),
    "reinforce_plus_plus_baseline": (
        {"advantage_estimator": "reinforce_plus_plus_baseline"},
        "train/loss",
    ),
    "entropy": ({"entropy_coef": "0.01", "entropy_quantile": "0.8"}, "train/entropy"),
    "mask_truncated": ({"mask_truncated": "true"}, "train/truncated"),
    "overlong": ({"overlong_buffer": "3"}, "train/overlong_penalty"),
    "rollout_is": (
        {"rollout_is": "sequence", "rollout_is_cap": "1.5"},
        "train/sampler_kl",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_fits_the_demo_from_the_command_line(variant, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["safegrpo-pl"])  # LightningCLI reads `args`, not pytest's
    settings, figure = VARIANTS[variant]
    flags = [arg for key, value in settings.items() for arg in (f"--model.loss.{key}", value)]
    main([*TINY_FIT, *flags, "--trainer.default_root_dir", str(tmp_path)])
    run = tmp_path / "logs" / "version_0"
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 2, f"{variant}: two optimiser steps logged"
    for row in rows:
        for name in ("train/loss", "train/entropy", figure):
            assert math.isfinite(float(row[name])), f"{variant}: {name} = {row.get(name)!r}"
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["loss"]
    for key, value in settings.items():
        assert str(saved[key]).lower() == value.lower(), f"{variant}: {key} not applied"


@pytest.mark.slow
def test_dynamic_sampling_from_the_command_line_stops_when_no_group_is_informative(
    tmp_path, monkeypatch
):
    """Rewards weighted to 0: every group is uninformative, and instead of drawing for ever
    (no update, so `max_steps` is never reached) the run stops at the draw cap, saying which
    setting to change (the counts of a run that trains: tests/test_dynamic_sampling.py)."""
    monkeypatch.setattr(sys, "argv", ["safegrpo-pl"])
    zero = ["--model.reward.tag_weight", "0", "--model.reward.behavior_weight", "0"]
    cap = ["--model.dynamic_sampling.max_extra_draws", "1"]
    with pytest.raises(RuntimeError, match=r"2 rollout batch\(es\) in a row .*max_extra_draws"):
        main([*TINY_FIT, *zero, *cap, "--trainer.default_root_dir", str(tmp_path)])
    saved = yaml.safe_load((tmp_path / "logs" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["dynamic_sampling"] == {"max_extra_draws": 1}
