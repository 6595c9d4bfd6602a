"""Nothing lost: a run stopped in the middle of an epoch and resumed through the real command
line repeats the unbroken run exactly (logged figures and final weights, bitwise on CPU), with
several optimiser steps per rollout batch; and so does one stopped by SIGTERM or SIGUSR1."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import run_in_own_group

pytestmark = pytest.mark.slow

KEYS = ("train/loss", "train/reward", "train/kl")
# 6 train records in batches of 2: 3 rollout batches per epoch; mini-batches of 1 prompt and
# 2 passes: 4 optimiser steps per rollout batch. 20 steps = 5 batches, across an epoch end.
STEPS, STEPS_PER_BATCH, CHECKPOINT_EVERY = 20, 4, 8
# The report callback's history must survive a resume too (under DDP it is left out: its end of
# fit is the subject of another test).
REPORT = "    - class_path: safegrpo_pl.run.callbacks.SafetyReport\n"
CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: {devices}
  strategy: {strategy}
  max_steps: {steps}
  check_val_every_n_epoch: null
  val_check_interval: 2             # rollout batches: validates right after checkpoint 1
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {out}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {out}, name: logs, version: 0}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {out}/ckpt, save_top_k: -1, save_last: true,
                  every_n_train_steps: {every}}}
{report}model:
  policy: {{name_or_path: "tiny:qwen2_5_vl", lora: null}}
  warmup: {{steps: 150, batch_size: 8, progress_bar: false}}
  group_size: 4
  mini_batch_size: 1
  num_iterations: 2
  kl_coef: 0.1
  lr: 1.0e-3
  lr_decay: cosine
  sampling: {{max_new_tokens: 64}}
data:
  dataset: demo
  guide: null
  batch_size: 2
  eval_batch_size: 4
  demo: {{num_train: {num_train}, num_val: 4, num_test: 4}}
"""


def run_cli(
    out: Path, cache: Path, *extra: str, devices: int = 1, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python -m safegrpo_pl fit` in its own process group; killed with all its children if
    it outlives `timeout` (a hung process ignores SIGTERM)."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    strategy = "ddp" if devices > 1 else "auto"
    config.write_text(
        CONFIG.format(
            out=out,
            devices=devices,
            strategy=strategy,
            steps=STEPS,
            every=CHECKPOINT_EVERY,
            num_train=6 * devices,  # 6 records per process: 3 rollout batches per epoch
            report=REPORT if devices == 1 else "",
        )
    )
    env = {**os.environ, "SAFEGRPO_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env["MASTER_PORT"] = str(_free_port())
    here = Path(__file__).parent
    paths = [str(here.parent / "src"), str(here), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    command = [sys.executable, "-m", "safegrpo_pl", "fit", "--config", str(config), *extra]
    returncode, output = run_in_own_group(command, env, timeout)
    return subprocess.CompletedProcess(command, returncode, output, "")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def logged(out: Path, key: str) -> dict[int, float]:
    """{logged step: value} of `key` in the run's metrics.csv."""
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]


def compare(
    straight: Path, resumed: Path, first_step: int, resumed_at: int | None = None
) -> tuple[int, float]:
    """Assert the resumed run logged what the unbroken one did from rollout batch
    `first_step` on and ended with the same weights; returns (steps compared, max diff).
    `resumed_at`: the optimiser step it resumed from (default: where `first_step` starts)."""
    compared = 0
    first_logged = first_step * STEPS_PER_BATCH
    if resumed_at is None:
        resumed_at = first_logged
    for key in KEYS:
        want, got = logged(straight, key), logged(resumed, key)
        # the logged step counts optimiser steps done: the resumed run logs those after it
        assert sorted(got) == [s for s in sorted(want) if s > first_logged], (key, got, want)
        for step, value in got.items():
            assert value == want[step], f"{key} at logged step {step}: {value} != {want[step]}"
        compared = len(got)
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and a
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), f"final weights differ by up to {diff:.3g}"
    old, new = (_report_history(out) for out in (straight, resumed))
    if old is not None:
        assert new["train"] == old["train"], "the report's training history was not carried over"
        # Lightning counts the validation due right after a checkpointed batch as done when it
        # resumes from that checkpoint; the unbroken run logged it, the resumed one does not.
        assert new["val"] == [row for row in old["val"] if row["step"] != resumed_at]
        assert len(old["val"]) > 1, "no validation in the middle of the run"
    return compared, diff


def _report_history(out: Path) -> dict | None:
    callbacks = torch.load(out / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)[
        "callbacks"
    ]
    return next((v["history"] for k, v in callbacks.items() if "SafetyReport" in k), None)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One model and warm-up cache for every run of this file."""
    return tmp_path_factory.mktemp("resume_cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache) -> Path:
    """The unbroken run of `STEPS` optimiser steps (its checkpoints serve as interruptions)."""
    out = tmp_path_factory.mktemp("straight")
    result = run_cli(out, cache)
    assert result.returncode == 0, result.stdout[-3000:]
    rewards = list(logged(out, "train/reward").values())
    assert len(rewards) == STEPS // STEPS_PER_BATCH, rewards
    assert len(set(rewards)) > 1, f"constant rewards {rewards}: nothing would be learnt"
    return out


def test_mid_epoch_resume_through_the_cli_repeats_the_unbroken_run(straight, cache, tmp_path):
    checkpoint = straight / "ckpt" / f"epoch=0-step={CHECKPOINT_EVERY}.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    (loader,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader["epoch"] == 0 and loader["batches"] == 2, f"not mid-epoch: {loader}"
    # Another seed on the command line: the checkpoint, not the seed, decides what comes next.
    result = run_cli(tmp_path, cache, "--ckpt_path", str(checkpoint), "--seed_everything", "7")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "dataloader is not resumable" not in result.stdout
    compared, diff = compare(straight, tmp_path, CHECKPOINT_EVERY // STEPS_PER_BATCH)
    assert compared == 3 and diff == 0.0


# SIGUSR1 here (SLURM's notice); SIGTERM takes the same path after Lightning's own handler, and
# the resume chain on configs/tiny.yaml (test_resume_any_stop.py) stops and resumes on it.
@pytest.mark.parametrize("signum", [signal.SIGUSR1], ids=["SIGUSR1"])
def test_a_stop_signal_writes_a_checkpoint_that_resumes_the_unbroken_run(
    straight, cache, tmp_path, signum
):
    stopped, resumed = tmp_path / "stopped", tmp_path / "resumed"
    # The signal lands between optimiser steps 10 and 11, inside rollout batch 3 (steps 9-12).
    sender = ["--trainer.callbacks+=signal_sender.SignalAtStep"]
    sender += ["--trainer.callbacks.step=11", f"--trainer.callbacks.signum={int(signum)}"]
    result = run_cli(stopped, cache, *sender)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    (saved,) = stopped.glob("hpc_ckpt_*.ckpt")
    step = torch.load(saved, map_location="cpu", weights_only=False)["global_step"]
    assert step == 12, f"stopped after step {step}, not at the end of the batch in progress"
    assert signal.Signals(signum).name in result.stdout
    result = run_cli(resumed, cache, "--ckpt_path", str(saved))
    assert result.returncode == 0, result.stdout[-3000:]
    compare(straight, resumed, step // STEPS_PER_BATCH)


# A stopped part of a run keeps the unbroken run's schedule (a longer max_steps would stretch
# the cosine decay, the one difference a resume may make: test_module.py).
FIXED_SCHEDULE = ("--model.lr_decay_steps", str(STEPS))


def _sigint_at(step: int) -> list[str]:
    return [
        "--trainer.callbacks+=signal_sender.SignalAtStep",
        f"--trainer.callbacks.step={step}",
        f"--trainer.callbacks.signum={int(signal.SIGINT)}",
    ]


def test_a_finished_fit_and_a_ctrl_c_resume_as_the_unbroken_run(straight, cache, tmp_path):
    """The `last.ckpt` of a fit that reached `max_steps 8` (in the middle of an epoch), resumed
    with `--ckpt_path last` and the full `max_steps`, stopped by Ctrl-C inside rollout batch 3
    (exit 130, `last.ckpt` at the batch's end), resumed again: the unbroken run, bitwise."""
    result = run_cli(tmp_path, cache, *FIXED_SCHEDULE, "--trainer.max_steps", "8")
    assert result.returncode == 0, result.stdout[-3000:]
    resume = [*FIXED_SCHEDULE, "--ckpt_path", "last"]
    result = run_cli(tmp_path, cache, *resume, *_sigint_at(11))
    assert result.returncode == 130, f"Ctrl-C exits 130: {result.stdout[-3000:]}"
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 12, "Ctrl-C finishes the rollout batch in progress"
    result = run_cli(tmp_path, cache, *resume)
    assert result.returncode == 0, result.stdout[-3000:]
    compared, diff = compare(straight, tmp_path, 0, resumed_at=8)
    assert compared == STEPS // STEPS_PER_BATCH and diff == 0.0


def test_two_ddp_processes_resume_a_finished_fit_as_the_unbroken_run(cache, tmp_path):
    """Each process samples its own prompts with its own random state: both states, and the
    loader position in the middle of an epoch, come back from the `last.ckpt` of a fit that
    reached `max_steps 8`, resumed with `--ckpt_path last` and the full `max_steps`."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    result = run_cli(straight, cache, devices=2, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:]
    result = run_cli(stopped, cache, *FIXED_SCHEDULE, "--trainer.max_steps", "8", devices=2)
    assert result.returncode == 0, result.stdout[-3000:]
    state = torch.load(stopped / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert len(state["rng_states"]["ranks"]) == 2, "one random state per process"
    (loader,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader["epoch"] == 0 and loader["batches"] == 2, f"not mid-epoch: {loader}"
    resume = [*FIXED_SCHEDULE, "--ckpt_path", "last"]
    result = run_cli(stopped, cache, *resume, devices=2, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:]
    compared, diff = compare(straight, stopped, 0)
    assert compared == STEPS // STEPS_PER_BATCH and diff == 0.0
