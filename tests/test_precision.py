"""Precision that learns: float32 trainable weights beside a bf16 frozen base, and a reference
placed like the policy's frozen weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.demo.dataset import DemoConfig
from safegrpo_pl.policy.model import LoraSettings, PolicySettings, load_policy
from safegrpo_pl.rollout.sampling import SamplingSettings
from safegrpo_pl.train.module import OptimizerPlan, SafeGRPOModule
from safegrpo_pl.train.policy_runner import PolicyRunner

LORA = LoraSettings(r=4, alpha=8)
STEPS = 400


def _lora_after_adamw(path: Path, dtype: str, trainable: str | None, plugin: Any) -> dict:
    """LoRA weights before and after STEPS AdamW steps at lr 1e-6 along a fixed gradient
    direction, with the model converted by the Lightning precision `plugin` as `fit` would."""
    torch.manual_seed(0)
    model = load_policy(str(path), dtype=dtype, trainable_dtype=trainable, lora=LORA)
    model = plugin.convert_module(model)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    before = {n: p.detach().float().clone() for n, p in lora.items()}
    generator = torch.Generator().manual_seed(1)
    direction = {
        n: torch.randint(0, 2, p.shape, generator=generator).float() * 2 - 1
        for n, p in lora.items()
    }
    optimizer = OptimizerPlan(1e-6, 0.01, "constant", max_steps=None).build(lora.values())
    for _ in range(STEPS):
        for name, param in lora.items():
            param.grad = (direction[name] * 1e-3).to(param.dtype)
        optimizer.step()
    return {n: (before[n], p.detach().float()) for n, p in lora.items()}


def _moves_like(run: dict, reference: dict) -> bool:
    """Every LoRA tensor changes as many entries (>= 99% of the float32 share) by as much (mean
    |change| within 2%) as in the all-float32 run."""
    for name, (before, after) in reference.items():
        run_before, run_after = run[name]
        share, run_share = (
            (after != before).float().mean(),
            (run_after != run_before).float().mean(),
        )
        size, run_size = (after - before).abs().mean(), (run_after - run_before).abs().mean()
        if run_share < 0.99 * share or abs(run_size / size - 1) > 0.02:
            return False
    return True


def test_lora_learns_as_in_float32_over_a_bf16_base_and_bf16_true_does_not(tiny_qwen3_text_path):
    float32 = _lora_after_adamw(tiny_qwen3_text_path, "float32", None, Precision())
    mixed = _lora_after_adamw(
        tiny_qwen3_text_path, "bfloat16", "float32", MixedPrecision("bf16-mixed", "cpu")
    )
    everything_bf16 = _lora_after_adamw(
        tiny_qwen3_text_path, "bfloat16", None, HalfPrecision("bf16-true")
    )
    name = next(iter(float32))
    share = (float32[name][1] != float32[name][0]).float().mean()
    assert share > 0.99, f"the float32 run itself did not move {name} ({share:.1%} changed)"
    assert _moves_like(mixed, float32)
    assert not _moves_like(everything_bf16, float32), "bf16-true learnt like float32"


def test_bf16_base_keeps_float32_trainable_weights(tiny_qwen3_text_path):
    model = load_policy(
        str(tiny_qwen3_text_path), dtype="bfloat16", trainable_dtype="float32", lora=LORA
    )
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    with pytest.raises(ValueError, match=r"model\.policy\.trainable_dtype"):
        load_policy(str(tiny_qwen3_text_path), trainable_dtype="float8")


def _full_runner(path: Path, dtype: str, trainable: str | None) -> PolicyRunner:
    settings = PolicySettings(name_or_path=str(path), dtype=dtype, trainable_dtype=trainable)
    return PolicyRunner.load(settings, str(path), kl_coef=0.01)


def test_reference_has_the_dtype_and_device_of_the_frozen_weights(tiny_qwen3_text_path):
    # float32 master copy of a bf16 model: the policy trains in float32, the reference stays bf16
    runner = _full_runner(tiny_qwen3_text_path, "bfloat16", "float32")
    runner.place_reference()
    assert {p.dtype for p in runner.model.parameters()} == {torch.float32}
    assert {p.dtype for p in runner.reference.parameters()} == {torch.bfloat16}
    # a float32 load that the trainer casts to bf16 (bf16-true): the reference follows
    runner = _full_runner(tiny_qwen3_text_path, "float32", None)
    runner.model = HalfPrecision("bf16-true").convert_module(runner.model)
    runner.place_reference()
    assert {p.dtype for p in runner.reference.parameters()} == {torch.bfloat16}
    # and wherever the policy goes, the reference goes
    runner.model.to("meta")
    runner.place_reference()
    assert {p.device.type for p in runner.reference.parameters()} == {"meta"}


def _fit(path: Path, root: Path, precision: str, **policy: Any) -> SafeGRPOModule:
    module = SafeGRPOModule(
        policy=PolicySettings(name_or_path=str(path), **policy),
        group_size=2,
        sampling=SamplingSettings(max_new_tokens=4),
    )
    data = SafeTagDataModule(
        dataset="demo",
        processor=str(path),
        batch_size=2,
        demo=DemoConfig(num_train=4, num_val=2, num_test=2),
    )
    L.Trainer(
        accelerator="cpu",
        max_steps=1,
        precision=precision,
        default_root_dir=root,
        logger=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(module, data)
    return module


def test_fit_keeps_float32_lora_under_bf16_mixed_and_refuses_bf16_true(
    tiny_qwen25vl_path, tmp_path
):
    module = _fit(tiny_qwen25vl_path, tmp_path / "a", "bf16-mixed", dtype="bfloat16", lora=LORA)
    assert {p.dtype for p in module.policy.parameters() if p.requires_grad} == {torch.float32}
    with pytest.raises(ValueError, match=r"trainer\.precision bf16-true"):
        _fit(tiny_qwen25vl_path, tmp_path / "b", "bf16-true", dtype="bfloat16", lora=LORA)
