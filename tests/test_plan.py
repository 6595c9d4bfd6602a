"""`plan`: the memory estimate, its check against measured peaks, and the paper's configs."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from safegrpo_pl.plan.cli import (
    config_dims,
    parse_memory,
    read_config,
    run_shape,
    setting,
    verdict,
)
from safegrpo_pl.plan.memory import GIB, RunShape, estimate, kv_bytes_per_token
from safegrpo_pl.train.module import SafeGRPOModule

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
sys.path.insert(0, str(ROOT / "scripts"))

import plan_check  # noqa: E402

HAS_CHUNKING = "rollout_micro_batch_size" in inspect.signature(SafeGRPOModule).parameters
FULL = ROOT / "configs" / "qwen-full.yaml"
PAPER = {
    "qwen.yaml": ASSETS / "qwen3-vl-8b-config.json",
    "qwen3-vl-4b.yaml": ASSETS / "qwen3-vl-4b-config.json",
}


def _paper(name: str, *extra: str):
    config = read_config(["--config", str(ROOT / "configs" / name), *extra])
    return config, config_dims(config, str(PAPER[name]))


def _paper_full():
    """configs/qwen.yaml + configs/qwen-full.yaml: all weights, FSDP2 over 4 GPUs."""
    config = read_config(["--config", str(ROOT / "configs" / "qwen.yaml"), "--config", str(FULL)])
    return config, config_dims(config, str(PAPER["qwen.yaml"]))


# -- the estimate against a measured fit step ------------------------------------------------


@pytest.fixture(scope="module")
def measured_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int | None], dict]:
    """{(case, chunk): plan_check's row}, each chunk size measured by `scripts/plan_check.py` in
    a fresh process: the profiler's allocation totals must not see what earlier tests left."""
    rows = {}
    for chunk in (None, 2):
        out = tmp_path_factory.mktemp("plan_check") / "rows.json"
        command = [sys.executable, str(ROOT / "scripts" / "plan_check.py"), "--json", str(out)]
        command += [] if chunk is None else ["--chunk", str(chunk)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        for case, row in zip(plan_check.CASES, json.loads(out.read_text()), strict=True):
            rows[(case.name, chunk)] = row
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 2], ids=["whole-rollout", "chunk-2"])
@pytest.mark.parametrize("case", plan_check.CASES, ids=[c.name for c in plan_check.CASES])
def test_estimate_is_within_25_percent_of_the_measured_peak_of_a_fit_step(
    case, chunk, measured_rows
):
    if chunk is not None and not HAS_CHUNKING:
        pytest.skip("model.rollout_micro_batch_size does not exist yet: one chunk size only")
    row = measured_rows[(case.name, chunk)]
    assert 0.75 <= row["ratio"] <= 1.25, (
        f"{case.name}: estimate {row['estimate_mib']:.2f} MiB vs measured "
        f"{row['measured_mib']:.2f} MiB (phases estimate/measured: {row['phases_mib']})"
    )


@pytest.mark.slow
def test_full_fine_tuning_plan_is_within_25_percent_of_two_fsdp_processes(tmp_path):
    """configs/qwen.yaml + configs/qwen-full.yaml at tiny size (FSDP2 over 2 gloo processes, bf16
    compute over float32 shards, gradient checkpointing), through `fit`'s own command line."""
    from processes import run_in_own_group

    script = [sys.executable, str(ROOT / "scripts" / "plan_check.py")]
    command = [*script, "--fsdp", str(tmp_path / "run"), "--json", str(tmp_path / "row.json")]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    try:
        status, output = run_in_own_group(command, env, timeout=600)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the two processes hung for 600 s and were killed:\n{hung.output[-4000:]}")
    assert status == 0, output[-6000:]
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["reference_dtypes"] == ["torch.bfloat16"], "the sharded reference left bf16"
    for phase, (estimated, measured) in row["phases_mib"].items():
        assert 0.75 <= estimated / measured <= 1.25, (
            f"{phase}: plan {estimated:.2f} MiB vs measured {measured:.2f} MiB on the worse rank "
            f"(resident parts: {row['resident_mib']})"
        )


def test_config_memory_comments_are_plans_output():
    import plan_comments

    for name, (args, model_config) in plan_comments.BLOCKS.items():
        text = (ROOT / name).read_text()
        fresh = plan_comments.replaced(text, plan_comments.block(args, model_config), name)
        assert fresh == text, (
            f"{name}: its memory comments are not plan's; run scripts/plan_comments.py"
        )


# -- arithmetic by hand ----------------------------------------------------------------------


def test_kv_cache_per_token_and_the_whole_rollout_cache_of_the_paper_config():
    # Without chunking: the whole per-GPU rollout decoded at once.
    config, dims = _paper("qwen.yaml", "--model.rollout_micro_batch_size", "null")
    # 2 (K, V) x 36 layers x 8 KV heads x 128 x 2 bytes = 147,456 bytes = 144 KiB
    assert kv_bytes_per_token(dims, 2) == 144 * 1024
    plan = estimate(dims, run_shape(config))
    generated = plan.phases["sampling"]["generated KV cache (B*G rows)"]
    # 64 prompts x G 8 x 4,096 new tokens x 144 KiB = 288 GiB, reserved up front
    assert generated == 64 * 8 * 4096 * 144 * 1024 == 288 * GIB


def test_sampling_and_logprob_memory_follow_the_chunk_not_the_rollout_batch():
    config, dims = _paper("qwen.yaml")
    small = estimate(dims, run_shape(config, rollout_chunk=4))
    doubled = estimate(dims, run_shape(config, rollout_chunk=4, rollout_batch=128))
    for phase in ("sampling", "log-probs"):
        assert small.phases[phase] == doubled.phases[phase], f"{phase} grew with the batch"
    bigger = estimate(dims, run_shape(config, rollout_chunk=8))
    assert bigger.phase_total("sampling") > small.phase_total("sampling")


def test_lora_adapters_of_the_paper_config_are_the_trainable_parameters():
    _, dims = _paper("qwen.yaml")
    # per layer, r 64 x (in + out): q 4096+4096, k and v 4096+1024, o 4096+4096,
    # gate and up 4096+12288, down 12288+4096 = 75,776 x 64; 36 layers
    assert dims.trainable_params == 36 * 64 * 75_776
    assert 8.5e9 < dims.total_params < 9.2e9


def test_the_4b_config_asset_is_qwen3_vl_4b():
    _, dims = _paper("qwen3-vl-4b.yaml")
    assert (dims.hidden_size, dims.num_layers, dims.num_kv_heads) == (2560, 36, 8)
    # 4.44 B parameters (tied embeddings counted once) plus the LoRA adapters
    assert 4.40e9 < dims.total_params - dims.trainable_params < 4.47e9


def test_full_fine_tuning_keeps_a_reference_copy_sharded_in_the_compute_dtype_under_fsdp():
    config, dims = _paper("qwen.yaml", "--model.policy.lora", "null")
    run = run_shape(config, rollout_chunk=4)
    assert estimate(dims, run).resident["reference copy"] == dims.total_params * 2
    # configs/qwen-full.yaml: float32 shards over 4 ranks; `fsdp.shard_models` casts the
    # reference to the compute dtype (bf16) before sharding it
    config, dims = _paper_full()
    run = run_shape(config)
    assert (run.shards, run.world_size, run.dtype_bytes, run.compute_dtype_bytes) == (
        True,
        4,
        4,
        2,
    )
    plan = estimate(dims, run)
    assert plan.resident["reference copy"] == dims.total_params * 2 / 4
    assert plan.phases["sampling"]["gathered weights (decode)"] == dims.total_params * 2


def test_a_frozen_vision_encoder_is_counted_as_frozen():
    config, full = _paper("qwen.yaml", "--model.policy.lora", "null")
    config, frozen = _paper(
        "qwen.yaml", "--model.policy.lora", "null", "--model.policy.freeze_vision_tower", "true"
    )
    assert full.trainable_params == full.total_params == frozen.total_params
    # Qwen3-VL-8B's vision encoder (27 blocks of width 1152, mergers not counted): 0.42 B
    encoder = full.trainable_params - frozen.trainable_params
    assert 0.35e9 < encoder < 0.6e9, encoder
    run = run_shape(config, rollout_chunk=4)
    saved = (
        estimate(full, run).resident["optimizer state"]
        - estimate(frozen, run).resident["optimizer state"]
    )
    assert saved == encoder * 8  # Adam's two float32 moments


def test_fsdp_shards_weights_gradients_and_optimiser_state():
    config, dims = _paper("qwen.yaml", "--model.policy.lora", "null")
    run = run_shape(config, rollout_chunk=4)
    sharded = estimate(dims, replace(run, shards=True)).resident
    whole = estimate(dims, run).resident
    assert sharded["optimizer state"] == pytest.approx(whole["optimizer state"] / 4)
    assert "sharded-layer gather" in sharded


def test_mixed_precision_keeps_trainables_and_adam_in_float32():
    config, dims = _paper("qwen.yaml")
    run = run_shape(config, rollout_chunk=4)
    uniform = estimate(dims, replace(run, precision="uniform")).resident["optimizer state"]
    mixed = estimate(dims, replace(run, precision="mixed")).resident["optimizer state"]
    assert mixed == 2 * uniform == dims.trainable_params * 8


# -- the paper's configs on 4 x 80 GB --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_fit_four_80gb_gpus_with_margin_when_the_rollout_is_chunked(name):
    config, dims = _paper(name)
    run = run_shape(config, rollout_chunk=4)
    assert run.world_size == 4 and run.gradient_checkpointing and run.dtype_bytes == 2
    for precision in ("uniform", "mixed"):
        result = verdict(dims, replace(run, precision=precision), parse_memory("80GB"), 0.1)
        plan = estimate(dims, replace(run, precision=precision))
        assert result.fits, f"{name} ({precision}): peak {plan.peak / GIB:.1f} GiB"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_without_chunking_plan_says_no_and_names_the_chunk_setting(name):
    config, dims = _paper(name, "--model.rollout_micro_batch_size", "null")
    result = verdict(dims, run_shape(config), parse_memory("80GB"))
    assert not result.fits
    assert set(result.changes) == {"model.rollout_micro_batch_size"}
    assert result.fixed_peak <= 0.9 * 80 * GIB


@pytest.mark.skipif(not HAS_CHUNKING, reason="model.rollout_micro_batch_size does not exist yet")
def test_the_chunk_setting_is_read_from_the_config():
    config, _ = _paper("qwen.yaml", "--model.rollout_micro_batch_size", "4")
    assert run_shape(config).rollout_chunk == 4


def test_a_training_pass_over_budget_asks_for_a_smaller_micro_batch():
    config, dims = _paper("qwen.yaml", "--model.micro_batch_size", "4")
    result = verdict(dims, run_shape(config, rollout_chunk=4), parse_memory("80GB"))
    assert result.changes.get("model.micro_batch_size") in (1, 2)


def test_parse_memory_reads_gpu_sizes():
    assert parse_memory("80GB") == parse_memory("80 GiB") == 80 * GIB
    assert parse_memory("512MB") == 512 * 2**20
    with pytest.raises(ValueError, match="--gpu_memory"):
        parse_memory("eighty")


def test_run_shape_rejects_a_chunk_larger_than_the_rollout_batch():
    with pytest.raises(ValueError, match="rollout_chunk is 9"):
        RunShape(
            group_size=2,
            rollout_batch=8,
            mini_batch=None,
            micro_batch=None,
            rollout_chunk=9,
            prompt_length=4,
            completion_length=4,
        )


# -- the command line ------------------------------------------------------------------------


def test_plan_subcommand_runs_on_the_tiny_config_and_writes_json(tmp_path, capsys):
    from safegrpo_pl.cli import main

    out = tmp_path / "plan.json"
    payload = main(["plan", "--config", str(ROOT / "configs" / "tiny.yaml"), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "total (peak)" in printed and "fits 80 GiB" in printed
    written = json.loads(out.read_text())
    assert written["fits"] and written["peak_bytes"] == payload["peak_bytes"] > 0
    assert written["run"]["lora"] is False and written["run"]["world_size"] == 1


def test_plan_subcommand_on_the_paper_config_names_the_fix(capsys):
    from safegrpo_pl.cli import main

    args = ["plan", "--config", str(ROOT / "configs" / "qwen.yaml")]
    args += ["--model.rollout_micro_batch_size", "null"]  # the whole rollout at once
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--model_config", str(PAPER["qwen.yaml"]), "--gpu_memory", "80GB"])
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    assert "does NOT fit 80 GiB" in printed and "--model.rollout_micro_batch_size" in printed


@pytest.mark.parametrize(
    ("gpu_memory", "status"), [("80GB", 0), ("40GB", 1)], ids=["fits", "does-not-fit"]
)
def test_plan_command_exits_non_zero_when_the_run_does_not_fit(gpu_memory, status, run_main):
    command = ["plan", "--config", str(ROOT / "configs" / "qwen.yaml")]
    command += ["--model_config", str(PAPER["qwen.yaml"]), "--gpu_memory", gpu_memory]
    exited, printed, _ = run_main(*command)
    assert exited == status, f"plan exited {exited}:\n{printed}"
    assert ("does NOT fit" in printed) == bool(status), printed


# -- plan and fit read the same keys ---------------------------------------------------------


def test_every_key_plan_reads_is_a_key_fit_accepts():
    import safegrpo_pl.plan.cli as plan_cli

    source = Path(plan_cli.__file__).read_text()
    keys = set(re.findall(r'"((?:model|data|trainer)\.[a-z_.]+)"', source))
    assert "model.recompute_head" in keys and len(keys) > 15, f"the key scan broke: {keys}"
    # fit's own parser, on a plain config and on the FSDP2 one (strategy init_args)
    parsed = [read_config(["--config", str(ROOT / "configs" / "tiny.yaml")]), _paper_full()[0]]
    unknown = sorted(k for k in keys if not any(k in config for config in parsed))
    assert not unknown, f"plan reads keys that fit does not accept: {unknown}"


def test_fit_accepts_recompute_head_and_plan_reads_it():
    tiny = ["--config", str(ROOT / "configs" / "tiny.yaml")]
    assert run_shape(read_config(tiny)).recompute_head, "recompute_head is on by default"
    assert not run_shape(read_config([*tiny, "--model.recompute_head", "false"])).recompute_head


def test_plan_fails_naming_a_key_fit_would_reject(capsys):
    from safegrpo_pl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            ["plan", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.recompute_hed", "1"]
        )
    assert exit_info.value.code != 0
    assert "model.recompute_hed" in capsys.readouterr().err
    # and a key plan's own code might ask for, which fit lacks
    config = read_config(["--config", str(ROOT / "configs" / "tiny.yaml")])
    with pytest.raises(KeyError, match=r"model\.reference_offload.*fit. does not accept"):
        setting(config, "model.reference_offload")
