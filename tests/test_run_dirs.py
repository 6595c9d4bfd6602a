"""Run folders: `--ckpt_path last` resumes, evaluations and predictions land in the fit's folder,
`--trainer.default_root_dir` moves every output, trained models are not warmed up again."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safegrpo_pl.core.files import TRAINED_MARKER
from safegrpo_pl.run.exports import save_adapter
from safegrpo_pl.run.folders import RunLogger, find_last_checkpoint, logger_for, run_folder_of
from safegrpo_pl.train.module import SafeGRPOModule
from safegrpo_pl.train.warmup import WarmupSettings, already_warmed_up

ROOT = Path(__file__).resolve().parents[1]


def test_find_last_checkpoint_picks_the_newest_last_ckpt_of_any_run(tmp_path):
    assert find_last_checkpoint(tmp_path / "missing") is None
    assert find_last_checkpoint(tmp_path) is None
    old = tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    new = tmp_path / "logs" / "version_1" / "checkpoints" / "last.ckpt"
    other = tmp_path / "logs" / "version_1" / "checkpoints" / "step=100.ckpt"
    for path in (old, new, other):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": 1}, path)  # an intact checkpoint archive
    os.utime(old, (time.time() + 10, time.time() + 10))  # the older folder, saved last
    assert find_last_checkpoint(tmp_path) == old


def test_run_folder_of_a_checkpoint_and_the_logger_of_each_stage(tmp_path):
    ckpt = tmp_path / "runs" / "logs" / "version_3" / "checkpoints" / "last.ckpt"
    folder = run_folder_of(ckpt)
    assert folder is not None
    assert folder.path == (tmp_path / "runs" / "logs" / "version_3").resolve()
    assert run_folder_of(tmp_path / "elsewhere.ckpt") is None

    fresh = logger_for("fit", str(tmp_path / "root"), None)
    assert Path(fresh.log_dir) == tmp_path / "root" / "logs" / "version_0"
    resumed = logger_for("fit", str(tmp_path / "root"), str(ckpt))
    assert Path(resumed.log_dir) == folder.path and resumed.append
    tested = logger_for("test", str(tmp_path / "root"), str(ckpt))
    assert Path(tested.log_dir) == folder.path / "test" and not tested.append


def test_run_logger_appends_to_the_metrics_of_a_resumed_fit(tmp_path):
    first = RunLogger(tmp_path, name="logs", version="version_0")
    first.log_metrics({"train/reward": 0.25}, step=0)
    first.save()
    resumed = RunLogger(tmp_path, name="logs", version="version_0", append=True)
    resumed.log_metrics({"train/reward": 0.5, "train/kl": 0.1}, step=1)
    resumed.save()
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "1"]
    assert rows[0]["train/reward"] == "0.25" and rows[1]["train/kl"] == "0.1"


def test_a_trained_or_warmed_up_folder_is_not_warmed_up_again(tmp_path, caplog):
    assert already_warmed_up(str(tmp_path)) is None
    (tmp_path / TRAINED_MARKER).write_text("{}")
    assert "exported by a SafeGRPO fit" in already_warmed_up(str(tmp_path))
    module = SafeGRPOModule(warmup=WarmupSettings(steps=1))
    module.settings = type(module.settings)(name_or_path=str(tmp_path))
    with caplog.at_level("WARNING", logger="safegrpo_pl"):
        # no records, no encoder: a warm-up would fail; the skip never reaches it
        assert module.warm_start([], None, {}) == str(tmp_path)
    assert module.policy_path == str(tmp_path)
    assert "format warm-up skipped" in caplog.text


class _FakeAdapter:
    """Stands in for a peft model: writes an adapter config naming its base."""

    def __init__(self, base: str) -> None:
        self.base = base

    def save_pretrained(self, folder) -> None:
        config = {"base_model_name_or_path": self.base, "r": 4}
        (Path(folder) / "adapter_config.json").write_text(json.dumps(config))


def test_an_adapter_whose_base_is_in_the_cache_gets_the_base_beside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEGRPO_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "cache" / "warmup" / "tiny-123"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_text("weights")
    target = tmp_path / "run" / "checkpoints" / "adapter"
    save_adapter(_FakeAdapter(str(base)), target, base_path=str(base))
    config = json.loads((target / "adapter_config.json").read_text())
    copy = tmp_path / "run" / "checkpoints" / "base"
    assert config["base_model_name_or_path"] == str(copy.resolve())
    assert (copy / "model.safetensors").read_text() == "weights"
    assert (target / TRAINED_MARKER).is_file()
    # a base the user owns (outside the cache) is left as the adapter names it
    mine = tmp_path / "my-model"
    mine.mkdir()
    save_adapter(_FakeAdapter(str(mine)), tmp_path / "other" / "adapter", base_path=str(mine))
    config = json.loads((tmp_path / "other" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(mine)
    assert not (tmp_path / "other" / "base").exists()


# -- the command line, end to end ---------------------------------------------------------------

TINY_RUN = (
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
    "--trainer.val_check_interval",
    "2",
)


def run_cli(*args: str, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SAFEGRPO_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    env.pop("SAFEGRPO_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "safegrpo_pl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_resume_test_predict_and_validate_an_export_from_the_command_line(tmp_path):
    root, cache = tmp_path / "elsewhere", tmp_path / "cache"
    common = (*TINY_RUN, "--trainer.default_root_dir", str(root))
    first = run_cli("fit", *common, "--trainer.max_steps", "2", cache=cache)
    console = first.stdout + first.stderr
    assert "GRPO steps: 100%" in console and "2/2" in console, "the bar counts optimiser steps"
    for noise in ("Epoch 0/-2", "v_num", "Total FLOPs", "LeafSpec", "Loading weights", "💡"):
        assert noise not in console, f"{noise!r} on the console"
    run = root / "logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file(), "default_root_dir not followed"
    assert (run / "summary.json").is_file() and (run / "checkpoints" / "model").is_dir()

    resumed = run_cli(
        "fit", *common, "--trainer.max_steps", "3", "--ckpt_path", "last", cache=cache
    )
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    assert not (root / "logs" / "version_1").exists(), "a resumed fit must continue its folder"
    with open(run / "metrics.csv") as f:
        steps = {int(r["step"]) for r in csv.DictReader(f) if r.get("train/reward")}
    assert steps == {1, 2, 3}, f"optimiser steps before and after the resume: {steps}"
    history = json.loads((run / "summary.json").read_text())["history"]
    assert [row["step"] for row in history["train"]] == [1, 2, 3], "same numbering as the csv"

    tested = run_cli("test", *common, "--ckpt_path", "last", cache=cache)
    assert f"Loaded model weights from the checkpoint at {run}" in tested.stderr + tested.stdout
    assert (run / "test" / "metrics.csv").is_file()
    assert "ckpt_path" in (run / "test" / "config.yaml").read_text(), "fit's config kept apart"

    run_cli("predict", *common, "--ckpt_path", "last", cache=cache)
    rows = (run / "predict" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 4 and "completion" in json.loads(rows[0])

    exported = str(run / "checkpoints" / "model")
    validated = run_cli("validate", *common, "--model.policy.name_or_path", exported, cache=cache)
    assert "format warm-up skipped" in validated.stderr
    assert "format warm-up: 2 steps" not in validated.stderr


def test_ckpt_path_last_passes_over_an_unreadable_newest_checkpoint(tmp_path, caplog):
    import logging
    import os

    import torch

    from safegrpo_pl.run.folders import find_last_checkpoint

    good = tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    good.parent.mkdir(parents=True)
    torch.save({"global_step": 2}, good)
    broken = tmp_path / "logs" / "version_1" / "checkpoints" / "last.ckpt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(good.read_bytes()[:40])  # cut off, as by a crash mid-copy
    os.utime(good, (1, 1))  # the broken one is the newest
    with caplog.at_level(logging.WARNING, logger="safegrpo_pl"):
        assert find_last_checkpoint(tmp_path) == good
    assert str(broken) in caplog.text and "cannot be read" in caplog.text
    assert f"resuming from {good}" in caplog.text
