"""The format warm-up: uninformative targets, response-only loss, a cache, and its outcome."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest
import torch

from safegrpo_pl.core.rewards import reward_parts, score_completions
from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.demo.dataset import DemoConfig
from safegrpo_pl.policy.model import (
    eos_token_ids,
    is_vision_parameter,
    load_policy,
    vision_token_ids,
)
from safegrpo_pl.rollout.sampling import SamplingSettings, sample_groups
from safegrpo_pl.train import warmup
from safegrpo_pl.train.warmup import (
    DONE_FILE,
    EOS_TOKEN,
    WarmupSettings,
    encode_targets,
    random_target,
    warmed_up_path,
    warmup_loss,
)


def _datamodule(model_path: Path, num_train: int = 16, num_val: int = 8) -> SafeTagDataModule:
    # No guide: short prompts keep these tests fast; the warm-up does not need the guide.
    dm = SafeTagDataModule(
        dataset="demo",
        processor=str(model_path),
        guide=None,
        batch_size=2,
        demo=DemoConfig(num_train=num_train, num_val=num_val, num_test=4),
    )
    dm.setup("fit")
    return dm


def test_random_targets_pass_the_format_gate_and_carry_no_signal():
    rng = random.Random(0)
    settings = WarmupSettings()
    draws = [
        reward_parts(
            random_target(rng, settings), image_tag="safe", text_tag="safe", combine_tag="unsafe"
        )
        for _ in range(2000)
    ]
    assert all(p.format == 1.0 for p in draws), "a warm-up target fails the format gate"
    # The label is unsafe, so "combined_correct" is exactly "the drawn tag is unsafe".
    unsafe_share = statistics.mean(p.combined_correct for p in draws)
    # 2000 fair coins: std 0.011; 0.05 is > 4 std.
    assert abs(unsafe_share - 0.5) < 0.05, f"combined tags not fair coins: {unsafe_share:.3f}"
    refusal_if_unsafe = statistics.mean(p.refused for p in draws if p.combined_correct)
    refusal_if_safe = statistics.mean(p.refused for p in draws if not p.combined_correct)
    assert abs(refusal_if_unsafe - refusal_if_safe) < 0.07, (
        f"refusal depends on the combined tag ({refusal_if_unsafe:.2f} vs "
        f"{refusal_if_safe:.2f}): the warm-up would teach the behaviour GRPO should learn"
    )


def test_targets_describe_the_inputs_but_not_their_safety():
    from safegrpo_pl.demo.dataset import make_demo_splits

    records = make_demo_splits(DemoConfig(num_train=200, num_val=0, num_test=0))["train"]
    rng = random.Random(0)
    settings = WarmupSettings(describe_inputs=True)
    unsafe_tag_when_unsafe, unsafe_tag_when_safe = [], []
    for record in records:
        target = random_target(rng, settings, record)
        thinking = target.split("<visual_safe>")[0]
        assert record.caption and record.caption in thinking, target
        assert f"Request: {' '.join(record.prompt.split())}" in thinking, target
        parts = reward_parts(
            target,
            image_tag=record.image_tag,
            text_tag=record.text_tag,
            combine_tag=record.combine_tag,
        )
        assert parts.format == 1.0, target
        said_unsafe = "<combined_safe>unsafe" in target
        (unsafe_tag_when_unsafe if record.combine_tag == "unsafe" else unsafe_tag_when_safe).append(
            said_unsafe
        )
    # ~100 records each side: std of each share ~0.05; a leak would show as a gap near 1.
    gap = statistics.mean(unsafe_tag_when_unsafe) - statistics.mean(unsafe_tag_when_safe)
    assert abs(gap) < 0.25, f"the combined tag follows the label (gap {gap:.2f})"
    plain = random_target(random.Random(0), WarmupSettings(describe_inputs=False), records[0])
    assert plain.startswith("<think><visual_safe>"), plain


def test_targets_end_with_eos_and_are_right_padded(tiny_qwen25vl_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen25vl_path)
    pad = tokenizer.pad_token_id
    ids, mask = encode_targets(
        tokenizer, ["<answer>a</answer>", "<answer>a longer one</answer>"], pad
    )
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    lengths = mask.sum(1).long().tolist()
    assert lengths[0] < lengths[1]
    for row, length in enumerate(lengths):
        assert ids[row, length - 1] == eos, "the closing <|im_end|> is not trained"
        assert (ids[row, length:] == pad).all() and (mask[row, length:] == 0).all()


def test_warmup_loss_is_cross_entropy_on_response_tokens_only(tiny_qwen25vl_path):
    dm = _datamodule(tiny_qwen25vl_path)
    record = dm.datasets["train"][0]
    batch = dm.encoder.encode([record])
    tokenizer = dm.encoder.tokenizer
    ids, mask = encode_targets(
        tokenizer, [random_target(random.Random(1), WarmupSettings())], tokenizer.pad_token_id
    )
    model = load_policy(str(tiny_qwen25vl_path)).eval()
    with torch.no_grad():
        ours = warmup_loss(model, batch, ids, mask)
        # Reference: the model's own loss, labels -100 on the prompt (one record, no padding).
        prompt_len = batch.input_ids.shape[1]
        kwargs = dict(batch.model_kwargs)
        kwargs["mm_token_type_ids"] = torch.cat(
            [kwargs["mm_token_type_ids"], torch.zeros_like(ids, dtype=torch.int32)], 1
        )
        labels = torch.cat([torch.full((1, prompt_len), -100), ids], 1)
        reference = model(
            input_ids=torch.cat([batch.input_ids, ids], 1),
            attention_mask=torch.ones(1, prompt_len + ids.shape[1], dtype=torch.long),
            labels=labels,
            **kwargs,
        ).loss
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def _warm(path, settings, dm):
    return warmed_up_path(
        str(path),
        settings,
        records=dm.train_records(),
        encoder=dm.encoder,
        dataset_key=dm.warmup_key(),
    )


def test_warmed_up_folder_is_cached_and_keyed_by_settings(tiny_qwen25vl_path, monkeypatch):
    dm = _datamodule(tiny_qwen25vl_path)
    settings = WarmupSettings(steps=2, batch_size=2, progress_bar=False)
    first = _warm(tiny_qwen25vl_path, settings, dm)
    assert (Path(first) / DONE_FILE).is_file()
    load_policy(first)  # loadable like any checkpoint

    def no_training(*args, **kwargs):
        raise AssertionError("the warm-up ran again although its folder was cached")

    monkeypatch.setattr(warmup, "train_warmup", no_training)
    assert _warm(tiny_qwen25vl_path, settings, dm) == first
    # The progress bar does not change the weights, so it shares the cache entry.
    quiet = WarmupSettings(steps=2, batch_size=2, progress_bar=True)
    assert _warm(tiny_qwen25vl_path, quiet, dm) == first
    other = WarmupSettings(steps=3, batch_size=2, progress_bar=False)
    with pytest.raises(AssertionError, match="ran again"):
        _warm(tiny_qwen25vl_path, other, dm)


def test_warmup_needs_train_records(tiny_qwen25vl_path):
    dm = _datamodule(tiny_qwen25vl_path)
    with pytest.raises(ValueError, match="no train records"):
        warmed_up_path(
            str(tiny_qwen25vl_path),
            WarmupSettings(steps=1),
            records=[],
            encoder=dm.encoder,
            dataset_key=dm.warmup_key(),
        )


def test_module_refuses_to_load_before_the_warmup_stage_ran(tiny_qwen25vl_path):
    from safegrpo_pl.policy.model import PolicySettings
    from safegrpo_pl.train.module import SafeGRPOModule

    module = SafeGRPOModule(
        policy=PolicySettings(name_or_path=str(tiny_qwen25vl_path)),
        warmup=WarmupSettings(steps=1),
    )
    with pytest.raises(ValueError, match="warm-up stage has not run"):
        module.configure_model()


@pytest.mark.parametrize("field", ["steps", "batch_size"])
def test_settings_refuse_zero_sizes(field):
    with pytest.raises(ValueError, match="at least 1"):
        WarmupSettings(**{field: 0})


@pytest.mark.slow
def test_warmup_teaches_the_format_but_not_the_judgement(tiny_qwen25vl_path):
    dm = _datamodule(tiny_qwen25vl_path, num_train=128, num_val=48)
    # Without the input description: this model is too small to learn to copy the request in
    # 150 steps, and the point here is the format and the tags.
    settings = WarmupSettings(
        steps=150, lr=3e-3, batch_size=16, progress_bar=False, describe_inputs=False
    )
    model = load_policy(_warm(tiny_qwen25vl_path, settings, dm))
    tokenizer = dm.encoder.tokenizer
    records = [dm.datasets["validation"][i] for i in range(48)]
    batch = dm.encoder.encode(records)
    group = 4
    rollout = sample_groups(
        model,
        batch,
        group_size=group,
        settings=SamplingSettings(max_new_tokens=96),
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        suppress_token_ids=vision_token_ids(tokenizer),
        generator=torch.Generator().manual_seed(0),
    )

    def repeat(tags: list[str]) -> list[str]:
        return [t for t in tags for _ in range(group)]

    parts = score_completions(
        rollout.texts, repeat(batch.image_tags), repeat(batch.text_tags), repeat(batch.combine_tags)
    )
    format_rate = statistics.mean(p.format for p in parts)
    combined_acc = statistics.mean(p.combined_correct for p in parts)
    assert format_rate > 0.85, f"sampled format rate {format_rate:.2f} after the warm-up"
    # 192 samples of a label-blind coin on ~50/50 labels: std ~0.036 (more with the per-record
    # correlation); 0.5 +- 0.2 is a chance band, far from what a judging model would reach.
    assert 0.3 < combined_acc < 0.7, (
        f"combined tag accuracy {combined_acc:.2f} after the warm-up: the warm-up leaked the "
        "labels, so GRPO would have nothing left to teach"
    )


@pytest.mark.parametrize("train_vision", [False, True])
def test_warmup_leaves_the_vision_tower_alone_unless_asked(tiny_qwen25vl_path, train_vision):
    # Random targets say nothing about the image: by default the vision tower keeps its
    # weights (and what tells one image from another), while the language model learns.
    dm = _datamodule(tiny_qwen25vl_path)
    model = load_policy(str(tiny_qwen25vl_path))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = WarmupSettings(
        steps=3, lr=1e-2, batch_size=4, progress_bar=False, train_vision=train_vision
    )
    warmup.train_warmup(model, dm.encoder, dm.train_records(), settings)
    moved = {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()}
    vision = {n: m for n, m in moved.items() if is_vision_parameter(n)}
    language = {n: m for n, m in moved.items() if not is_vision_parameter(n)}
    assert vision and language, sorted(moved)[:5]
    assert any(language.values()), "the language model did not train"
    assert any(vision.values()) == train_vision, vision
    assert all(p.grad is None for p in model.parameters()), "gradients left behind"


def test_warmup_cache_key_follows_the_demo_drawing_version(tiny_qwen25vl_path, monkeypatch):
    # The same DemoConfig drawn by newer drawing code is another training set: a warm-up
    # cached for the old images must not be reused.
    from safegrpo_pl.data import datamodule as data

    dm = _datamodule(tiny_qwen25vl_path)
    before = dm.warmup_key()
    monkeypatch.setattr(data, "DRAWING_VERSION", data.DRAWING_VERSION + 1)
    assert dm.warmup_key() != before
    assert dm.warmup_key()["demo"]["drawing_version"] == before["demo"]["drawing_version"] + 1


def test_warmup_cache_key_follows_the_canned_answers(tmp_path, monkeypatch):
    # The targets end in a canned answer: new answer texts are new targets, so a warm-up
    # cached for the old ones must not be reused (it would write the old, longer answers).
    settings = WarmupSettings(progress_bar=False)
    before = warmup.warmup_cache_key(str(tmp_path), settings, {"data": "same"})
    monkeypatch.setattr(warmup, "REFUSAL_ANSWERS", ("Sorry, no.", *warmup.REFUSAL_ANSWERS[1:]))
    assert warmup.warmup_cache_key(str(tmp_path), settings, {"data": "same"}) != before
    monkeypatch.undo()
    # an answer the targets do not use (beyond answer_choices) leaves the key alone
    monkeypatch.setattr(warmup, "HELPFUL_ANSWERS", (*warmup.HELPFUL_ANSWERS[:-1], "Unused."))
    assert warmup.warmup_cache_key(str(tmp_path), settings, {"data": "same"}) == before
