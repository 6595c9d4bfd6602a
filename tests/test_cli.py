"""The command line: configs load, the paper's config builds, and `fit` runs end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import Qwen3VLConfig

from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.policy.model import LoraSettings, build_on_meta
from safegrpo_pl.run.trainer_cli import SafeGRPOCLI
from safegrpo_pl.train.module import SafeGRPOModule

ROOT = Path(__file__).resolve().parents[1]
# Training configs; the evaluation's (eval*.yaml) are checked in test_eval_run.py.
CONFIGS = sorted(c for c in (ROOT / "configs").glob("*.yaml") if not c.name.startswith("eval"))
# The GPU configs are parsed here on the CPU with these overrides.
CPU = [
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "1",
    "--trainer.strategy",
    "auto",
    "--trainer.precision",
    "32-true",
]


def _parse(*configs: Path, extra: tuple[str, ...] = ()) -> SafeGRPOCLI:
    args = [a for c in configs for a in ("--config", str(c))]
    return SafeGRPOCLI(
        SafeGRPOModule,
        SafeTagDataModule,
        run=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=[*args, *CPU, *extra],
    )


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_and_instantiates(config, tmp_path):
    configs = [config]
    variant_of = {
        "qwen-4bit.yaml": "qwen.yaml",
        "tiny-lora.yaml": "tiny.yaml",
        "qwen-full.yaml": "qwen.yaml",
        "multinode.yaml": "qwen.yaml",
    }
    if config.name in variant_of:  # a variant, used on top of its base config
        configs = [ROOT / "configs" / variant_of[config.name], config]
    cli = _parse(*configs, extra=("--trainer.default_root_dir", str(tmp_path)))
    assert isinstance(cli.model, SafeGRPOModule)
    assert cli.datamodule.hparams["processor"] == cli.model.settings.name_or_path, (
        "data.processor must follow model.policy.name_or_path"
    )


def test_paper_config_matches_the_paper(tmp_path):
    cli = _parse(
        ROOT / "configs" / "qwen.yaml", extra=("--trainer.default_root_dir", str(tmp_path))
    )
    model = cli.model
    assert model.group_size == 8 and model.kl_coef == 0.01 and model.optimizer_plan.lr == 1e-6
    assert model.loss_settings.kl_estimator == "k3"
    assert model.sampling.temperature == 1.0 and model.sampling.max_new_tokens == 4096
    assert model.val_sampling.max_new_tokens == 4096, "OmegaConf interpolation not resolved"
    # 4 GPUs x 64 prompts per rollout, 4 x 16 per optimiser step: 4 steps per rollout.
    assert cli.datamodule.hparams["batch_size"] // model.mini_batch_size == 4


def test_paper_config_builds_qwen3_vl_8b_on_the_meta_device(tmp_path):
    """Catches wrong class names, LoRA targets and arguments without downloading 17 GB."""
    cli = _parse(
        ROOT / "configs" / "qwen.yaml", extra=("--trainer.default_root_dir", str(tmp_path))
    )
    lora = cli.model.settings.lora
    assert isinstance(lora, LoraSettings)
    card = json.loads((ROOT / "tests" / "assets" / "qwen3-vl-8b-config.json").read_text())
    card = {k: v for k, v in card.items() if k not in ("model_type", "architectures")}
    model = build_on_meta(Qwen3VLConfig(**card), lora)
    total = sum(p.numel() for p in model.parameters())
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    assert 8.5e9 < total < 9.2e9, f"{total / 1e9:.2f} B parameters is not an 8B model"
    assert trainable and all("lora_" in n and "language_model" in n for n, _ in trainable)
    # 36 layers x 7 projections x (A + B)
    assert len(trainable) == 36 * 7 * 2, len(trainable)


@pytest.mark.slow
def test_cli_fit_runs_two_steps_and_writes_checkpoints_and_logs(tmp_path):
    env = {**os.environ, "SAFEGRPO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "safegrpo_pl",
        "fit",
        "--model.policy.name_or_path",
        "tiny:qwen2_5_vl",
        "--model.group_size",
        "2",
        "--model.sampling.max_new_tokens",
        "8",
        "--model.policy.lora.r",
        "4",
        "--model.policy.lora.alpha",
        "8",
        "--data.batch_size",
        "2",
        "--data.demo.num_train",
        "4",
        "--data.demo.num_val",
        "2",
        "--data.demo.num_test",
        "2",
        "--trainer.max_steps",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.val_check_interval",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in result.stderr + result.stdout
    (metrics,) = tmp_path.glob("logs/version_*/metrics.csv")
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    assert sum(1 for r in rows if r.get("train/reward")) == 2, "two training steps logged"
    assert any(r.get("val/format_rate") for r in rows), "validation metrics missing"
    (checkpoint,) = tmp_path.glob("logs/version_*/checkpoints/*.ckpt")
    # Resumed with another lr: Lightning keeps the checkpoint's, and the run says so.
    resume = [*command[:-2], "--trainer.max_steps", "3", "--ckpt_path", str(checkpoint)]
    result = subprocess.run(
        [*resume, "--model.lr", "0.5", "--trainer.default_root_dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if "model settings replace" in x]
    assert "model.lr 0.5 -> 1e-06" in line and "model.group_size" not in line, line


def test_replaced_settings_names_each_changed_model_key():
    from safegrpo_pl.run.trainer_cli import replaced_settings

    configured = {"lr": 0.5, "group_size": 2, "sampling.max_new_tokens": 8, "sampling.top_p": 1.0}
    resumed = {"lr": 1e-3, "group_size": 2, "sampling.max_new_tokens": 16, "sampling.top_p": 1.0}
    assert replaced_settings(configured, resumed) == [
        "model.lr 0.5 -> 0.001",
        "model.sampling.max_new_tokens 8 -> 16",
    ]
    assert replaced_settings(resumed, resumed) == []


def test_cli_hides_the_manual_optimisation_note_and_nothing_else():
    import warnings

    from lightning.pytorch.utilities import rank_zero_warn

    from safegrpo_pl.run.console import silence_known_notes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_notes()
        rank_zero_warn(
            "Using ModelCheckpoint with manual optimization and every_n_train_steps, but no "
            "pre-optimization state was saved."
        )
        rank_zero_warn("some other note")
    assert [str(w.message) for w in caught] == ["some other note"]


# -- a command line that forgives ------------------------------------------------------------


def _typed(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m safegrpo_pl ARGS` as a user types it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SAFEGRPO_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "safegrpo_pl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_top_level_help_lists_every_subcommand_with_one_line() -> None:
    from safegrpo_pl.cli import EXTRA_COMMANDS, TRAINER_COMMANDS

    result = _typed("--help")
    assert result.returncode == 0, result.stderr
    for command in (*TRAINER_COMMANDS, *EXTRA_COMMANDS, "plan", "evaluate"):
        (line,) = [x for x in result.stdout.splitlines() if x.split()[:1] == [command]]
        assert len(line.split()) > 3, f"{command} needs a one-line summary in --help: {line!r}"


def test_a_mistyped_command_gets_one_line_with_the_closest() -> None:
    result = _typed("fitt", "--config", "configs/tiny.yaml")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: unknown command 'fitt' (did you mean fit?); `python -m safegrpo_pl --help` "
        "lists the commands: fit, validate, test, predict, plan, evaluate, judge"
    ]


def test_a_mistyped_option_gets_one_line_with_the_closest_known_ones(run_main) -> None:
    status, _, err = run_main("fit", "--config", "configs/tiny.yaml", "--model.groupsize", "4")
    assert status == 2, "argparse's status for a usage error"
    assert err.strip().splitlines() == [
        "error: unknown option --model.groupsize (did you mean --model.group_size?); "
        "`python -m safegrpo_pl fit --help` lists every option"
    ], "one line, not the 117-line usage"


def test_an_abbreviated_option_is_refused_not_expanded(run_main) -> None:
    status, _, err = run_main("fit", "--config", "configs/tiny.yaml", "--trainer.max_step", "5")
    assert status == 2, "--trainer.max_step must not be read as --trainer.max_steps"
    assert "unknown option --trainer.max_step (did you mean --trainer.max_steps?)" in err


def test_fsdp1_on_the_cpu_is_refused_with_the_strategies_that_run(run_main) -> None:
    status, _, err = run_main("fit", "--config", "configs/tiny.yaml", "--trainer.strategy", "fsdp")
    assert status == 1
    assert "Traceback" not in err, "a one-line error, not Lightning's traceback"
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "--trainer.strategy ModelParallelStrategy" in line and "--trainer.strategy ddp" in line


def test_a_config_file_key_that_is_not_an_option_gets_the_closest() -> None:
    from safegrpo_pl.core.errors import parser_error_line

    message = "Problem with given config: Group 'model' does not accept option 'groupsize'"
    line = parser_error_line(message, ["--model.group_size", "--model.lr"], "fit --help")
    assert line == (
        "error: unknown option --model.groupsize (did you mean --model.group_size?); "
        "`fit --help` lists every option"
    )


def test_another_parser_error_is_kept_on_one_line() -> None:
    from safegrpo_pl.core.errors import parser_error_line

    message = "Parser key \"trainer.max_steps\":\n  Expected a <class 'int'>. Got value: abc"
    line = parser_error_line(message, [], "fit --help")
    assert "\n" not in line and "Got value: abc" in line


@pytest.mark.parametrize(
    ("strategy", "accelerator", "gpu", "refused"),
    [
        ("fsdp", "cpu", False, True),
        ("deepspeed_stage_3", "auto", False, True),
        ({"class_path": "lightning.pytorch.strategies.FSDPStrategy"}, "auto", False, True),
        ("fsdp", "auto", True, False),  # a GPU is there: Lightning decides
        ("ddp", "cpu", False, False),
        ({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}, "cpu", False, False),
    ],
)
def test_check_strategy_refuses_gpu_only_strategies_on_the_cpu(
    strategy, accelerator, gpu, refused
) -> None:
    from safegrpo_pl.run.trainer_cli import check_strategy

    if refused:
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            check_strategy(strategy, accelerator, gpu_available=gpu)
    else:
        check_strategy(strategy, accelerator, gpu_available=gpu)
