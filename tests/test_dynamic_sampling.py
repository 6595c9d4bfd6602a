"""DAPO's dynamic sampling (docs/method.md section 4.16): the group filter and the trim on
hand-worked tensors, the held groups across draws and through a checkpoint, and short fits of
the demo policy: it logs its counts, trains exactly as the default when no group is dropped,
and a run stopped while groups are held resumes to the unbroken run bitwise."""

from __future__ import annotations

import zlib
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from test_module import _logged, _module, _trainer

from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.core.rewards import RewardParts
from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.demo.dataset import DemoConfig
from safegrpo_pl.policy.inputs import PromptBatch
from safegrpo_pl.rl.grpo import DynamicSampling, groups_to_hold, informative_groups
from safegrpo_pl.rollout.sampling import Rollout
from safegrpo_pl.train.module import HELD_BACK, HELD_KEY, Draw, HeldGroups, SafeGRPOModule

G = 2


def test_groups_with_all_equal_rewards_are_the_uninformative_ones():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.25, 0.25, 0.0, 1.0, 0.0, 0.0])  # 5 groups
    assert informative_groups(rewards, 2).tolist() == [False, True, False, True, False]
    # G = 5: one differing reward anywhere in the group makes it informative
    assert informative_groups(rewards, 5).tolist() == [True, True]
    assert informative_groups(torch.full((6,), 0.1), 3).tolist() == [False, False]


def test_the_trim_keeps_the_first_informative_groups_in_order():
    informative = torch.tensor([False, True, True, False, True])
    assert groups_to_hold(informative, 5) == [1, 2, 4]
    assert groups_to_hold(informative, 2) == [1, 2]  # the surplus of a draw is left out
    assert groups_to_hold(informative, 0) == []
    assert groups_to_hold(torch.zeros(3, dtype=torch.bool), 3) == []


def test_a_negative_draw_cap_is_refused():
    with pytest.raises(ValueError, match="max_extra_draws is -1"):
        DynamicSampling(max_extra_draws=-1)


def _draw(tag: str, rewards: list[float], widths: list[int]) -> Draw:
    """A hand-made draw: prompt b has `widths[b]` real tokens (ids 100*b + ...), left-padded;
    its completions have row-numbered ids; one 2x2-patch image per prompt."""
    prompts, width = len(widths), max(widths)
    ids = torch.zeros(prompts, width, dtype=torch.long)
    mask = torch.zeros(prompts, width, dtype=torch.long)
    for b, w in enumerate(widths):
        ids[b, width - w :] = 100 * b + torch.arange(1, w + 1)
        mask[b, width - w :] = 1
    records = [
        SafetyRecord(None, f"{tag}{b}", "safe", "safe", "safe", id=f"{tag}{b}")
        for b in range(prompts)
    ]
    batch = PromptBatch(
        records,
        ids,
        mask,
        {
            "pixel_values": torch.arange(prompts * 4 * 3, dtype=torch.float).view(-1, 3),
            "image_grid_thw": torch.tensor([[1, 2, 2]] * prompts),
        },
    )
    n = prompts * G
    rollout = Rollout(
        completion_ids=torch.arange(n * 3).view(n, 3),
        completion_mask=torch.ones(n, 3),
        texts=[f"{tag}-{i}" for i in range(n)],
        lengths=torch.full((n,), 3),
        truncated=torch.zeros(n, dtype=torch.bool),
        group_size=G,
        sampler_logp=-torch.arange(n * 3.0).view(n, 3),
    )
    parts = [RewardParts(r, 1.0, 0.0, 0.0, False, False, False, False) for r in rewards]
    return Draw(batch, rollout, parts, torch.tensor(rewards))


def _add(held: HeldGroups, draw: Draw, target: int = 3, multiple: int = 1):
    return held.add(draw, informative_groups(draw.rewards, G), target, multiple, pad_id=0)


def test_prompts_selected_and_joined_again_are_the_batch():
    batch = _draw("a", [0.0] * 6, [2, 4, 3]).batch
    joined = PromptBatch.join([batch.select([0]), batch.select([1, 2])], pad_id=0)
    assert torch.equal(joined.input_ids, batch.input_ids)
    assert torch.equal(joined.attention_mask, batch.attention_mask)
    for key, value in batch.model_kwargs.items():
        assert torch.equal(joined.model_kwargs[key], value), key


def test_informative_groups_are_held_across_draws_until_a_rollout_batch_is_full():
    held = HeldGroups(DynamicSampling(max_extra_draws=3))
    first = _draw("a", [1, 1, 0, 1, 0, 0], [2, 3, 2])  # only group a1 is informative
    assert _add(held, first) == (None, {})
    second = _draw("b", [0, 1, 1, 0, 1, 1], [4, 1, 2])  # b0 and b1 fill it; b2 dropped
    ready, counts = _add(held, second)
    assert ready is not None and counts == {
        "groups_kept": 3.0,
        "groups_dropped": 3.0,
        "extra_draws": 1.0,
    }
    assert [r.id for r in ready.batch.records] == ["a1", "b0", "b1"]
    assert ready.rewards.tolist() == [0, 1, 0, 1, 1, 0]
    assert ready.rollout.texts == ["a-2", "a-3", "b-0", "b-1", "b-2", "b-3"]
    assert torch.equal(ready.rollout.sampler_logp[:2], first.rollout.sampler_logp[2:4])
    # prompts left-padded to the longest (b0's 4 tokens), pixels cut by image
    assert ready.batch.input_ids[:2].tolist() == [[0, 101, 102, 103], [1, 2, 3, 4]]
    assert torch.equal(
        ready.batch.model_kwargs["pixel_values"][:4], torch.arange(12.0, 24).view(4, 3)
    )
    assert held.held is None and held.draws == 0, "the next update starts a fresh cycle"


def test_the_draw_cap_trains_on_whole_mini_batches_or_stops_the_run():
    held = HeldGroups(DynamicSampling(max_extra_draws=1))
    assert _add(held, _draw("a", [1, 0, 1, 1, 0, 1], [1, 1, 1]), multiple=2) == (None, {})
    ready, counts = _add(held, _draw("b", [0, 0, 1, 0, 1, 1], [1, 1, 1]), multiple=2)
    assert [r.id for r in ready.batch.records] == ["a0", "a2"], "3 held, 1 mini-batch of 2"
    assert counts["groups_kept"] == 2.0 and counts["extra_draws"] == 1.0
    held = HeldGroups(DynamicSampling(max_extra_draws=0))
    with pytest.raises(RuntimeError, match=r"Raise model\.dynamic_sampling\.max_extra_draws"):
        _add(held, _draw("c", [1, 1, 0, 0, 1, 1], [1, 1, 1]))


def test_held_groups_go_through_a_weights_only_checkpoint(tmp_path):
    held = HeldGroups(DynamicSampling(max_extra_draws=3))
    _add(held, _draw("a", [1, 0, 0, 0, 1, 1], [2, 3, 2]))
    torch.save(held.state_dict(), tmp_path / "held.pt")
    restored = HeldGroups(DynamicSampling(max_extra_draws=3))
    restored.load_state_dict(torch.load(tmp_path / "held.pt", weights_only=True))
    last = _draw("b", [0, 1, 1, 0, 1, 1], [4, 1, 2])
    (want, want_counts), (got, got_counts) = _add(held, last), _add(restored, last)
    assert got_counts == want_counts
    assert [r.id for r in got.batch.records] == [r.id for r in want.batch.records]
    assert got.rollout.texts == want.rollout.texts and got.parts == want.parts
    for name in ("input_ids", "attention_mask"):
        assert torch.equal(getattr(got.batch, name), getattr(want.batch, name))
    assert torch.equal(got.rollout.completion_ids, want.rollout.completion_ids)


class HalfConstantReward(SafeGRPOModule):
    """Records whose id hashes odd score 0 for every completion (an uninformative group); the
    others score their completion's place in the group (never all equal)."""

    def score(self, batch, rollout):
        parts = super().score(batch, rollout)
        constant = [zlib.crc32(r.id.encode()) % 2 for r in batch.records]
        group = rollout.group_size
        return [
            replace(p, total=0.0 if constant[i // group] else (i % group) / group)
            for i, p in enumerate(parts)
        ]


class AllInformative(SafeGRPOModule):
    """Every completion scores its place in the group: no group is ever dropped."""

    def score(self, batch, rollout):
        parts = super().score(batch, rollout)
        return [replace(p, total=(i % rollout.group_size) / 2) for i, p in enumerate(parts)]


def _fit(path: Path, root: Path, steps: int, cls=HalfConstantReward, ckpt_path=None, **kwargs):
    """`steps` optimiser steps on 8 demo records (4 rollout batches of 2 per epoch)."""
    callbacks = list(kwargs.pop("callbacks", ()))
    module = _module(path, cls=cls, **kwargs)
    data = SafeTagDataModule(
        dataset="demo",
        processor=str(path),
        batch_size=2,
        demo=DemoConfig(num_train=8, num_val=2, num_test=2),
    )
    trainer = _trainer(root, steps, callbacks=callbacks)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.slow
def test_a_fit_with_dynamic_sampling_logs_its_counts_and_holds_draws_back(
    tiny_qwen25vl_path, tmp_path
):
    L.seed_everything(0)
    dynamic = DynamicSampling(max_extra_draws=3)
    _, trainer = _fit(tiny_qwen25vl_path, tmp_path, 3, dynamic_sampling=dynamic)
    kept, dropped, extra = (
        _logged(tmp_path, f"train/{k}") for k in ("groups_kept", "groups_dropped", "extra_draws")
    )
    assert trainer.global_step == 3 and len(kept) == 3, "one logged row per update"
    assert kept == [2.0, 2.0, 2.0], "every update trains on a full rollout batch of 2"
    assert sum(dropped) > 0 and sum(extra) > 0, "the demo's records gave no uninformative group"
    draws = trainer.fit_loop.epoch_loop.batch_progress.total.completed
    assert draws == 3 + sum(extra), "each extra draw is one more rollout batch of the loader"
    assert _logged(tmp_path, "train/zero_var_groups") == [0.0] * 3, "dropped groups trained on"


@pytest.mark.slow
def test_dynamic_sampling_that_drops_nothing_trains_as_the_default(tiny_qwen25vl_path, tmp_path):
    """Every record informative: the same samples, updates and weights as with it off."""
    runs = {}
    for name, dynamic in (("off", None), ("on", DynamicSampling(max_extra_draws=0))):
        L.seed_everything(0)
        runs[name], _ = _fit(
            tiny_qwen25vl_path, tmp_path / name, 2, cls=AllInformative, dynamic_sampling=dynamic
        )
    for key in ("train/loss", "train/reward", "train/kl", "train/grad_norm"):
        assert _logged(tmp_path / "on", key) == _logged(tmp_path / "off", key), key
    assert _logged(tmp_path / "on", "train/groups_kept") == [2.0, 2.0]
    with open(tmp_path / "off" / "logs" / "version_0" / "metrics.csv") as f:
        assert "groups_kept" not in f.readline(), "off: the default figures only"
    on, off = (dict(runs[k].policy.named_parameters()) for k in ("on", "off"))
    assert all(torch.equal(p, on[n]) for n, p in off.items())


class StopWhileHeld(L.Callback):
    """Write a checkpoint at the first rollout batch held back after optimiser step 1, and
    stop there."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs == HELD_BACK and trainer.global_step >= 1 and not self.path.exists():
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


@pytest.mark.slow
def test_a_run_stopped_while_groups_are_held_resumes_to_the_unbroken_run(
    tiny_qwen25vl_path, tmp_path
):
    dynamic = DynamicSampling(max_extra_draws=3)
    steps = 4  # over an epoch end: 4 updates take more than the epoch's 4 rollout batches
    L.seed_everything(0)
    straight, _ = _fit(tiny_qwen25vl_path, tmp_path / "straight", steps, dynamic_sampling=dynamic)
    L.seed_everything(0)
    saved = tmp_path / "held.ckpt"
    _, first = _fit(
        tiny_qwen25vl_path,
        tmp_path / "first",
        steps,
        callbacks=[StopWhileHeld(saved)],
        dynamic_sampling=dynamic,
    )
    state = torch.load(saved, weights_only=True)
    (rank,) = state[HELD_KEY]["ranks"]
    assert rank["held"] is not None and rank["draws"] >= 1, "no group was held at the stop"
    assert first.global_step < steps
    L.seed_everything(123)  # the checkpoint, not the seed, decides what comes next
    resumed, _ = _fit(
        tiny_qwen25vl_path,
        tmp_path / "second",
        steps,
        ckpt_path=saved,
        dynamic_sampling=dynamic,
    )
    for key in ("train/loss", "train/reward", "train/groups_kept", "train/extra_draws"):
        want = _logged(tmp_path / "straight", key)
        got = _logged(tmp_path / "first", key) + _logged(tmp_path / "second", key)
        assert len(want) == steps and got == want, (key, got, want)
    weights = [dict(m.policy.named_parameters()) for m in (straight, resumed)]
    assert all(torch.equal(p, weights[1][n]) for n, p in weights[0].items())


@pytest.mark.slow
def test_two_ddp_ranks_agree_on_every_update(tiny_qwen25vl_path, tmp_path):
    """Each rank holds its own informative groups; the update waits for the rank with the
    fewest, and every rank trains on the same number (`tests/distributed_run.py`, gloo)."""
    from test_distributed import run_ranks

    args = ("--devices", "2", "--strategy", "ddp", "--prompts", "8", "--steps", "3")
    ranks = run_ranks(tmp_path, tiny_qwen25vl_path, *args, "--dynamic", "3", timeout=300)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 3
    assert ranks[0]["updates"] == ranks[1]["updates"] == [4, 4, 4]  # 8 prompts: 4 per rank
    draws = [len(r["seen"]) for r in ranks]
    assert draws[0] == draws[1] > 3, f"no rollout batch was held back: {draws}"
    held = [r["held_after"] for r in ranks]
    assert held[0] != held[1], f"the ranks never held different counts: {held}"
    assert ranks[0]["weights"].keys() and all(
        torch.equal(w, ranks[1]["weights"][k]) for k, w in ranks[0]["weights"].items()
    )


def test_the_report_keeps_one_training_row_per_update():
    """Lightning's callback metrics still hold the last update's figures at a held-back batch:
    the report must not count them twice."""
    from types import SimpleNamespace

    from safegrpo_pl.run.callbacks import SafetyReport

    report = SafetyReport()
    trainer = SimpleNamespace(global_step=1, callback_metrics={"train/reward": torch.tensor(0.5)})
    for outputs in (None, HELD_BACK, HELD_BACK):
        report.on_train_batch_end(trainer, None, outputs, None, 0)
    assert report.history.train == [{"step": 1, "train/reward": 0.5}]
