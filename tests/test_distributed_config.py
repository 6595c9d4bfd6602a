"""The multi-process configs: they parse into the strategies and batches they promise, and the
full fine-tuning config's memory estimate holds for the real model's size."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from transformers import Qwen3VLConfig

from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.policy.model import build_on_meta
from safegrpo_pl.run.trainer_cli import SafeGRPOCLI
from safegrpo_pl.train.module import SafeGRPOModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GiB = 2**30


def _parse(*names: str, extra: tuple[str, ...] = ()) -> SafeGRPOCLI:
    """Parse on the CPU, keeping each config's strategy and process counts."""
    args = [a for name in names for a in ("--config", str(CONFIGS / name))]
    return SafeGRPOCLI(
        SafeGRPOModule,
        SafeTagDataModule,
        run=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=[*args, "--trainer.accelerator", "cpu", *extra],
    )


def test_multinode_config_keeps_the_papers_global_batch(tmp_path):
    cli = _parse("qwen.yaml", "multinode.yaml", extra=("--trainer.default_root_dir", str(tmp_path)))
    trainer = cli.trainer
    assert trainer.num_nodes == 2 and trainer.num_devices == 4
    assert isinstance(trainer.strategy, DDPStrategy)
    ranks = trainer.num_nodes * trainer.num_devices
    assert cli.datamodule.batch_size * ranks == 256  # prompts per rollout, all ranks
    assert cli.model.mini_batch_size * ranks == 64  # prompts per optimiser step


def test_full_finetuning_config_shards_every_weight_over_four_gpus(tmp_path):
    cli = _parse(
        "qwen.yaml",
        "qwen-full.yaml",
        extra=("--trainer.default_root_dir", str(tmp_path), "--trainer.devices", "4"),
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy._data_parallel_size == 4 and strategy._tensor_parallel_size == 1
    model = cli.model
    assert model.settings.lora is None and model.settings.dtype == "float32"
    assert model.fsdp_compute_dtype == "bfloat16" and model.kl_coef > 0


def test_full_finetuning_memory_estimate_fits_80_gb(tmp_path):
    """The arithmetic of configs/qwen-full.yaml's comments, from the real model's size."""
    cli = _parse(
        "qwen.yaml",
        "qwen-full.yaml",
        extra=("--trainer.default_root_dir", str(tmp_path), "--trainer.devices", "4"),
    )
    card = json.loads((ROOT / "tests" / "assets" / "qwen3-vl-8b-config.json").read_text())
    config = Qwen3VLConfig(**{k: v for k, v in card.items() if k != "architectures"})
    params = sum(p.numel() for p in build_on_meta(config).parameters())
    text = config.text_config
    ranks, model, data = 4, cli.model, cli.datamodule
    states = (4 + 4 + 8) * params / ranks + 2 * params / ranks  # fp32 w, g, AdamW; bf16 ref
    gathered = 2 * params  # the whole policy in bf16 while it decodes
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 2
    sequences = data.batch_size * model.group_size
    kv = kv_per_token * (
        sequences * model.sampling.max_new_tokens + data.batch_size * data.max_prompt_length
    )
    peak = (states + gathered + kv) / GiB
    assert 8.7e9 < params < 8.9e9
    assert peak < 80 * 1e9 / GiB, f"{peak:.1f} GiB"
    assert abs(peak - 72.2) < 0.5, f"the config's comment says 72.2, computed {peak:.1f}"
