"""The GRPO LightningModule: wiring properties that the pure-function tests cannot see."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.demo.dataset import DemoConfig
from safegrpo_pl.policy.model import LoraSettings, PolicySettings, is_vision_parameter, load_policy
from safegrpo_pl.rollout.sampling import SamplingSettings
from safegrpo_pl.train.module import SafeGRPOModule

TINY_DEMO = DemoConfig(num_train=4, num_val=2, num_test=2)


class LengthRewardModule(SafeGRPOModule):
    """A random-weight policy never writes the format, so every rule reward is 0 and nothing
    moves. This reward (a made-up function of the text) gives GRPO something to learn."""

    def score(self, batch, rollout):
        parts = super().score(batch, rollout)
        return [
            replace(p, total=(len(text) % 5) / 4)
            for p, text in zip(parts, rollout.texts, strict=True)
        ]


def _data(path: Path, **kwargs) -> SafeTagDataModule:
    return SafeTagDataModule(
        dataset="demo", processor=str(path), batch_size=2, demo=TINY_DEMO, **kwargs
    )


def _module(path: Path, cls=LengthRewardModule, **kwargs) -> SafeGRPOModule:
    policy_keys = ("lora", "dtype", "gradient_checkpointing", "freeze_vision_tower")
    policy = PolicySettings(
        name_or_path=str(path), **{k: kwargs.pop(k) for k in policy_keys if k in kwargs}
    )
    settings = dict(
        policy=policy,
        group_size=2,
        lr=1e-2,
        sampling=SamplingSettings(max_new_tokens=6),
    )
    settings.update(kwargs)
    return cls(**settings)


def _trainer(root: Path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        default_root_dir=root,
        logger=CSVLogger(root, name="logs", version=0),
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _logged(root: Path, key: str) -> list[float]:
    with open(root / "logs" / "version_0" / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def test_group_size_below_two_is_refused():
    with pytest.raises(ValueError, match="group_size must be at least 2"):
        SafeGRPOModule(group_size=1)


def test_single_update_takes_old_logprobs_without_an_extra_pass(
    tiny_qwen25vl_path, monkeypatch, tmp_path
):
    calls: list[bool] = []
    original = SafeGRPOModule.frozen_logprobs

    def counting(self, batch, rollout, *, reference, **kwargs):
        calls.append(reference)
        return original(self, batch, rollout, reference=reference, **kwargs)

    monkeypatch.setattr(SafeGRPOModule, "frozen_logprobs", counting)
    L.seed_everything(0)
    _trainer(tmp_path / "a", 1).fit(_module(tiny_qwen25vl_path), _data(tiny_qwen25vl_path))
    assert calls == [True], f"one update per rollout must reuse logp.detach(); passes: {calls}"
    calls.clear()
    L.seed_everything(0)
    module = _module(tiny_qwen25vl_path, num_iterations=2)
    _trainer(tmp_path / "b", 2).fit(module, _data(tiny_qwen25vl_path))
    assert calls == [False, True], f"two updates need the sampling policy's log-probs: {calls}"


class GradientRecorder(L.Callback):
    """Keeps the gradients seen by the first optimiser step (Adam's sign-like first update would
    blow float noise in near-zero gradients up to a full learning-rate step, so compare these)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {
                n: p.grad.clone()
                for n, p in pl_module.policy.named_parameters()
                if p.grad is not None
            }


def _first_gradients(path: Path, root: Path, **kwargs) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    recorder = GradientRecorder()
    _trainer(root, 1, callbacks=[recorder]).fit(_module(path, **kwargs), _data(path))
    return recorder.grads


def test_micro_batching_does_not_change_the_gradient(tiny_qwen25vl_path, tmp_path):
    whole = _first_gradients(tiny_qwen25vl_path, tmp_path / "whole")
    split = _first_gradients(tiny_qwen25vl_path, tmp_path / "split", micro_batch_size=1)
    assert whole.keys() == split.keys() and whole
    assert any(g.abs().max() > 1e-4 for g in whole.values()), "the test reward gave no gradient"
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_recomputed_lm_head_gives_the_plain_training_gradient(
    tiny_qwen25vl_path, tmp_path, monkeypatch
):
    from safegrpo_pl.rollout import logprobs

    plain = _first_gradients(tiny_qwen25vl_path, tmp_path / "plain", recompute_head=False)
    vocab = load_policy(str(tiny_qwen25vl_path)).get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 3 * vocab)  # 3 tokens per chunk
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint,
        "checkpoint",
        lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs),
    )
    recomputed = _first_gradients(tiny_qwen25vl_path, tmp_path / "recomputed")
    assert calls, "model.recompute_head (on by default) never reached the LM head's chunks"
    assert plain.keys() == recomputed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_the_policy_moves_and_the_reference_does_not(tiny_qwen25vl_path, tmp_path):
    L.seed_everything(0)
    module = _module(tiny_qwen25vl_path)
    _trainer(tmp_path, 2).fit(module, _data(tiny_qwen25vl_path))
    reference = module._reference[0]
    changed = [
        n
        for (n, p), (_, r) in zip(
            module.policy.named_parameters(), reference.named_parameters(), strict=True
        )
        if not torch.equal(p, r)
    ]
    assert changed, "two GRPO steps with a non-constant reward left every weight unchanged"
    assert not any(p.requires_grad for p in reference.parameters()), "reference is trainable"


def test_a_frozen_vision_tower_gets_no_gradient_and_keeps_its_weights(tiny_vl_path, tmp_path):
    L.seed_everything(0)
    recorder = GradientRecorder()
    module = _module(tiny_vl_path, freeze_vision_tower=True)
    _trainer(tmp_path, 2, callbacks=[recorder]).fit(module, _data(tiny_vl_path))
    encoder = {
        n for n, _ in module.policy.named_parameters() if is_vision_parameter(n, merger=False)
    }
    mergers = {n for n, _ in module.policy.named_parameters() if is_vision_parameter(n)} - encoder
    assert encoder and mergers, "the tiny model lost its vision encoder or merger"
    assert not encoder & recorder.grads.keys(), "a frozen encoder weight got a gradient"
    assert mergers <= recorder.grads.keys(), "the merger must stay trainable"
    reference = dict(module._reference[0].named_parameters())
    policy = dict(module.policy.named_parameters())
    assert all(torch.equal(policy[n], reference[n]) for n in encoder), "the encoder moved"
    assert any(not torch.equal(policy[n], reference[n]) for n in mergers), "no merger moved"


def test_freezing_the_vision_tower_of_a_text_model_is_refused(tiny_qwen3_text_path):
    with pytest.raises(ValueError, match="no vision tower"):
        load_policy(str(tiny_qwen3_text_path), freeze_vision_tower=True)


def test_lora_checkpoint_holds_only_adapters(tiny_qwen25vl_path, tmp_path):
    L.seed_everything(0)
    module = _module(tiny_qwen25vl_path, lora=LoraSettings(r=2, alpha=4))
    trainer = _trainer(tmp_path, 1)
    trainer.fit(module, _data(tiny_qwen25vl_path))
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    state = torch.load(tmp_path / "x.ckpt", weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state), sorted(state)[:4]
    assert module._reference == [], "LoRA must use the base with adapters off, not a copy"


@pytest.mark.parametrize("lora", [None, LoraSettings(r=2, alpha=4)], ids=["full", "lora"])
@pytest.mark.parametrize("every", [2, 1], ids=["epoch_end", "mid_epoch"])
def test_resume_logs_the_same_as_an_unbroken_run(tiny_qwen25vl_path, tmp_path, every, lora):
    """2 rollout batches per epoch: a checkpoint every 2 steps falls on epoch ends, every step
    also in the middle of one (the run resumes from the first)."""
    keys = ("train/loss", "train/reward", "train/kl")
    L.seed_everything(0)
    straight = _module(tiny_qwen25vl_path, lora=lora)
    _trainer(tmp_path / "straight", 4).fit(straight, _data(tiny_qwen25vl_path))
    L.seed_everything(0)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1
    )
    _trainer(tmp_path / "first", every, callbacks=[checkpoint]).fit(
        _module(tiny_qwen25vl_path, lora=lora), _data(tiny_qwen25vl_path)
    )
    L.seed_everything(123)  # the checkpoint, not the seed, must decide what comes next
    resumed = _module(tiny_qwen25vl_path, lora=lora)
    _trainer(tmp_path / "second", 4).fit(
        resumed,
        _data(tiny_qwen25vl_path),
        ckpt_path=checkpoint.best_model_path or checkpoint.last_model_path,
    )
    for key in keys:
        want = _logged(tmp_path / "straight", key)
        got = _logged(tmp_path / "first", key) + _logged(tmp_path / "second", key)
        assert len(want) == 4, want
        assert got == want, key  # exactly: same samples, same arithmetic
    weights = [dict(m.policy.named_parameters()) for m in (straight, resumed)]
    assert all(torch.equal(p, weights[1][n]) for n, p in weights[0].items())


def test_lr_multiplier_shapes():
    from safegrpo_pl.train.module import lr_multiplier

    assert [lr_multiplier(s, 4, "constant") for s in range(5)] == [1.0] * 5
    assert [lr_multiplier(s, 4, "linear") for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    # Half a cosine: 1 at the start, 1/2 half-way, 0 at the end, (1 + cos(pi/4)) / 2 at 1/4.
    cosine = [lr_multiplier(s, 4, "cosine") for s in range(5)]
    assert cosine == pytest.approx([1.0, 0.5 + 0.5 * 2**-0.5, 0.5, 0.5 - 0.5 * 2**-0.5, 0.0])
    # A warm-up of 3 steps rises to 1 along a line, then the decay spans the remaining steps.
    warm = [lr_multiplier(s, 7, "linear", warmup_steps=3) for s in range(8)]
    assert warm == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert [lr_multiplier(s, None, "constant", 1) for s in range(3)] == [0.5, 1.0, 1.0]


def test_lr_warmup_schedule_and_its_errors():
    from safegrpo_pl.train.module import OptimizerPlan

    weight = torch.nn.Parameter(torch.zeros(2))
    built = OptimizerPlan(1.0, 0.0, "constant", max_steps=None, warmup_steps=2).build([weight])
    optimizer, schedule = built["optimizer"], built["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    # A run shorter than its warm-up (a quick check of a config) runs, still rising.
    short = OptimizerPlan(1.0, 0.0, "cosine", max_steps=2, warmup_steps=20).build([weight])
    assert short["optimizer"].param_groups[0]["lr"] == pytest.approx(1 / 21)
    with pytest.raises(ValueError, match="max_steps, which is not set"):
        OptimizerPlan(1.0, 0.0, "cosine", max_steps=None, warmup_steps=2).build([weight])
    with pytest.raises(ValueError, match="lr_warmup_steps is -1"):
        OptimizerPlan(1.0, 0.0, "constant", max_steps=None, warmup_steps=-1)


def test_a_resumed_schedule_continues_at_its_step_stretched_to_the_new_max_steps():
    """A finished 2-step cosine run resumed with max_steps 4: its third step runs at the 4-step
    schedule's rate for step 2 (0.5 of lr), not at the 0 the 2-step schedule ended on; at the
    same max_steps the restored rate is kept bit for bit."""
    from safegrpo_pl.train.module import OptimizerPlan, continue_schedule

    weight = torch.nn.Parameter(torch.zeros(2))
    first = OptimizerPlan(1.0, 0.0, "cosine", max_steps=2).build([weight])
    for _ in range(2):
        first["optimizer"].step()
        first["lr_scheduler"]["scheduler"].step()
    saved = [first[k].state_dict() for k in ("optimizer",)]
    saved.append(first["lr_scheduler"]["scheduler"].state_dict())
    for max_steps, want in ((4, 0.5), (2, first["optimizer"].param_groups[0]["lr"])):
        again = OptimizerPlan(1.0, 0.0, "cosine", max_steps=max_steps).build([weight])
        optimizer, schedule = again["optimizer"], again["lr_scheduler"]["scheduler"]
        optimizer.load_state_dict(saved[0])
        schedule.load_state_dict(saved[1])
        continue_schedule(schedule)
        # cos(pi * 2/4): half way down; at max_steps 2 the restored rate, exactly
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, abs=1e-12)
        assert schedule.get_last_lr() == [optimizer.param_groups[0]["lr"]]
    assert optimizer.param_groups[0]["lr"] == first["optimizer"].param_groups[0]["lr"]


def test_lr_decay_is_stepped_once_per_optimiser_step(tiny_qwen25vl_path, tmp_path):
    data = _data(tiny_qwen25vl_path)
    module = _module(tiny_qwen25vl_path, lr_decay="linear", lr=1e-2)
    _trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    # Logged after each step's update: 1e-2 * (1 - 1/2), then 1e-2 * (1 - 2/2).
    assert _logged(tmp_path, "train/lr") == pytest.approx([5e-3, 0.0])
    with pytest.raises(ValueError, match="choose one of"):
        _module(tiny_qwen25vl_path, lr_decay="exponential")
