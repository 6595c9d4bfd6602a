"""Two real processes on this CPU (gloo) against one process on the same global batch.

Each run is `tests/distributed_run.py` in a subprocess of its own session, under a hard
timeout that kills the whole process group: a hung rank ignores SIGTERM, and a hang must fail
the test, never block the suite. Lightning's launcher starts rank 1 in the same group.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import run_in_own_group

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_run.py"
TIMEOUT_S = 300  # the machine is shared and slow; a healthy run takes well under a minute

pytestmark = pytest.mark.slow


def run_ranks(out: Path, model: Path, *args: str, timeout: float = TIMEOUT_S) -> list[dict]:
    """Run the script; returns each rank's results. Fails (never hangs) after `timeout`."""
    run_killable([str(SCRIPT), str(out), "--model", str(model), *args], timeout)
    ranks = sorted(out.glob("rank*.pt"))
    return [torch.load(path, weights_only=False) for path in ranks]


def run_killable(args: list[str], timeout: float = TIMEOUT_S) -> str:
    """`python ARGS` in a session of its own; kill the whole group after `timeout`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    try:
        returncode, output = run_in_own_group([sys.executable, *args], env, timeout)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"{' '.join(args)} hung for {timeout} s and was killed:\n{hung.output[-4000:]}")
    assert returncode == 0, f"run failed ({returncode}):\n{output[-6000:]}"
    return output


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_process(tiny_qwen25vl_path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one")
    # The same micro-batch of one prompt as each rank: micro-batching leaves the gradient equal
    # only up to float rounding, which AdamW turns into ~lr-sized moves of weights whose
    # gradient is near 0 (rarely used embedding rows), and that would hide what is compared.
    (result,) = run_ranks(out, tiny_qwen25vl_path, "--devices", "1", "--micro", "1")
    return result


def _compare(one: dict, ranks: list[dict], label: str) -> dict[str, float]:
    figures = {
        "loss": max(abs(a - b) for a, b in zip(one["loss"], ranks[0]["loss"], strict=True)),
        "grad_norm": max(
            abs(a - b) for a, b in zip(one["grad_norm"], ranks[0]["grad_norm"], strict=True)
        ),
        "weights": max_difference(one["weights"], ranks[0]["weights"]),
    }
    print(f"{label}: 1 vs 2 processes, max |difference|: {figures}")
    return figures


@pytest.fixture(scope="module")
def ddp_ranks(tiny_qwen25vl_path, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    args = ("--devices", "2", "--strategy", "ddp", "--micro", "1")
    return run_ranks(out, tiny_qwen25vl_path, *args)


def test_ddp_two_processes_equal_one_process(one_process, ddp_ranks):
    ranks = ddp_ranks
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert any(g > 1e-3 for g in one_process["grad_norm"]), "the test reward gave no gradient"
    figures = _compare(one_process, ranks, "ddp")
    assert figures["loss"] < 1e-6 and figures["grad_norm"] < 1e-5, figures
    # lr 1e-3 moves a weight by ~1e-3 per step: the runs agree to well under one step
    assert figures["weights"] < 5e-5, figures
    assert max_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0.0
    for rank in ranks:  # every rank logs the global figures
        assert rank["loss"] == ranks[0]["loss"] and rank["grad_norm"] == ranks[0]["grad_norm"]


def test_ddp_deals_whole_prompts_once_per_epoch_and_counts_each_record_once(one_process, ddp_ranks):
    ranks = ddp_ranks
    all_ids = set(one_process["seen"][0])
    for step in range(2):  # 4 prompts, 2 per rank: one step is one epoch
        per_rank = [rank["seen"][step] for rank in ranks]
        assert all(len(ids) == 2 for ids in per_rank)
        dealt = [i for ids in per_rank for i in ids]
        assert sorted(dealt) == sorted(all_ids), f"step {step}: {per_rank}"
    # 3 validation records over 2 ranks: the sampler pads to 4, the metrics count 3
    assert one_process["val_count"] == 3.0
    assert [rank["val_count"] for rank in ranks] == [3.0, 3.0]
    assert ranks[0]["val"] == pytest.approx(one_process["val"], abs=1e-6)


@pytest.fixture(scope="module")
def fsdp_run(tiny_qwen25vl_path, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp")
    args = ("--devices", "2", "--strategy", "fsdp", "--micro", "1", "--checks")
    return out, run_ranks(out, tiny_qwen25vl_path, *args)


def test_fsdp_two_processes_equal_one_process(one_process, fsdp_run):
    _, ranks = fsdp_run
    assert ranks[1]["weights"] == {}, "the full weights are gathered to rank 0 only"
    figures = _compare(one_process, ranks, "fsdp")
    assert figures["loss"] < 1e-6 and figures["grad_norm"] < 1e-5, figures
    assert figures["weights"] < 5e-5, figures
    assert ranks[0]["loss"] == ranks[1]["loss"]
    assert [rank["val_count"] for rank in ranks] == [3.0, 3.0]


def test_fsdp_ranks_decode_the_same_number_of_steps(fsdp_run):
    _, ranks = fsdp_run
    early, late = ranks[0]["decode"], ranks[1]["decode"]
    assert early["lengths"] == [1, 1] and late["lengths"] == [5, 5], (early, late)
    assert early["forwards"] == late["forwards"] == 5  # prefill + 4 steps, on both ranks
    assert not early["inference"] and not late["inference"]


def test_fsdp_checkpoint_round_trip_and_export(fsdp_run):
    from transformers import AutoModelForImageTextToText

    out, ranks = fsdp_run
    weights = ranks[0]["weights"]
    assert max_difference(ranks[0]["restored"], weights) == 0.0
    exported = AutoModelForImageTextToText.from_pretrained(out / "export")
    assert max_difference(exported.state_dict(), weights) == 0.0


def test_fsdp_trains_around_a_frozen_vision_encoder(tiny_qwen25vl_path, tmp_path):
    from safegrpo_pl.policy.model import is_vision_parameter, load_policy

    args = ("--devices", "2", "--strategy", "fsdp", "--micro", "1", "--freeze-vision")
    trained = run_ranks(tmp_path, tiny_qwen25vl_path, *args)[0]["weights"]
    initial = load_policy(str(tiny_qwen25vl_path)).state_dict()
    moved = {name: not torch.equal(trained[name], initial[name]) for name in trained}
    encoder = [name for name in moved if is_vision_parameter(name, merger=False)]
    merger = [name for name in moved if is_vision_parameter(name) and name not in encoder]
    assert encoder and not any(moved[name] for name in encoder), "a frozen weight moved"
    assert any(moved[name] for name in merger), "the merger did not train"
    assert any(moved[name] for name in moved if not is_vision_parameter(name))


CLI_CALLBACKS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, every_n_train_steps: 1}
    - class_path: safegrpo_pl.run.exports.AdapterCheckpoint
    - class_path: safegrpo_pl.run.callbacks.SafetyReport
"""


STRATEGIES = {
    "ddp": ("--trainer.strategy", "ddp"),
    "fsdp2": (
        *("--trainer.strategy", "ModelParallelStrategy"),
        *("--trainer.strategy.data_parallel_size", "2"),
        *("--trainer.strategy.tensor_parallel_size", "1"),
    ),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_readme_fit_ends_on_two_processes(tmp_path, strategy):
    """The README's commands on two CPU processes (DDP, and FSDP2 through
    `ModelParallelStrategy`), shortened: DDP used to hang after training (a rank-zero-only
    collective in the report)."""
    extra = tmp_path / "callbacks.yaml"
    extra.write_text(CLI_CALLBACKS)
    root = tmp_path / "run"
    args = [
        *("-m", "safegrpo_pl", "fit", "--config", str(ROOT / "configs" / "tiny.yaml")),
        *("--config", str(extra), "--trainer.accelerator", "cpu", "--trainer.devices", "2"),
        *STRATEGIES[strategy],
        *("--trainer.max_steps", "2", "--model.warmup.steps", "2"),
        *("--data.demo.num_train", "64", "--data.demo.num_val", "5"),
        *("--trainer.val_check_interval", "1", "--trainer.default_root_dir", str(root)),
        *("--trainer.enable_progress_bar", "false"),
    ]
    output = run_killable(args)
    version = root / "logs" / "version_0"
    assert (version / "summary.json").is_file() and (version / "checkpoints" / "last.ckpt").exists()
    assert (version / "checkpoints" / "model" / "model.safetensors").is_file()
    assert "sync_dist=True" not in output, "an epoch-level value was logged unsynced"
    assert output.count("SafetyReport: wrote") == 1, "the report is written by rank 0 only"
    # each rank evaluates its shard of the 5 held-out records (padded to 6); 5 are gathered
    assert output.count("(5 records)") == 2, "before and after, every record once"


def test_fsdp_gathers_bf16_for_compute_and_keeps_fp32_master_weights(
    tiny_qwen25vl_path, one_process, tmp_path
):
    args = ("--devices", "2", "--strategy", "fsdp", "--compute-dtype", "bfloat16")
    ranks = run_ranks(tmp_path, tiny_qwen25vl_path, *args)
    weights = ranks[0]["weights"]
    assert {w.dtype for w in weights.values()} == {torch.float32}
    figures = _compare(one_process, ranks, "fsdp bf16 compute")
    # bf16 compute moves the result a little (so it ran), an fp32 update keeps it close
    assert 0 < figures["weights"] < 1e-2 and figures["grad_norm"] < 1e-2, figures
