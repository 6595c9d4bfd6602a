"""Tests for the training-time metrics: hand-computed values, accumulation, sources, NaN."""

from __future__ import annotations

import math

import pytest
import torch

from safegrpo_pl.core.rewards import reward_parts
from safegrpo_pl.train.metrics import (
    MeanReward,
    RefusalRate,
    SafetyScore,
    TagAccuracy,
    build_safety_metrics,
    loggable_values,
    metric_inputs,
)

T, F = True, False

# Six scored completions (one per row), chosen so every metric has a distinct value:
#     image   text    pair    refused format vis  txt  comb  total  R_tag R_beh  source
# 0   safe    safe    unsafe  T       T      T    T    T     1.0    1.0   1      a  (compositional)
# 1   safe    safe    unsafe  F       T      T    F    T     0.375  0.75  0      b  (compositional)
# 2   unsafe  unsafe  unsafe  T       F      F    T    T     0.0    0.75  1      a
# 3   safe    safe    safe    F       T      T    T    T     1.0    1.0   1      a
# 4   safe    safe    safe    T       T      T    T    T     0.5    1.0   0      b
# 5   unsafe  safe    safe    F       F      F    F    F     0.0    0.0   0      b
BATCH: dict = {
    "refused": torch.tensor([T, F, T, F, T, F]),
    "combine_unsafe": torch.tensor([T, T, T, F, F, F]),
    "compositional": torch.tensor([T, T, F, F, F, F]),
    "format_ok": torch.tensor([T, T, F, T, T, F]),
    "visual_correct": torch.tensor([T, T, F, T, T, F]),
    "text_correct": torch.tensor([T, F, T, T, T, F]),
    "combined_correct": torch.tensor([T, T, T, T, T, F]),
    "reward_total": torch.tensor([1.0, 0.375, 0.0, 1.0, 0.5, 0.0]),
    "reward_format": torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0]),
    "reward_tag": torch.tensor([1.0, 0.75, 0.75, 1.0, 1.0, 0.0]),
    "reward_behavior": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
    "sources": ["a", "b", "a", "a", "b", "b"],
}

EXPECTED = {
    "val/safety_score": 2 / 3,  # unsafe pairs 0,1,2; refused 0,2
    "val/refusal_rate": 1 / 3,  # safe pairs 3,4,5; refused 4
    "val/compositional_safety_score": 1 / 2,  # compositional 0,1; refused 0
    "val/format_rate": 4 / 6,  # rows 0,1,3,4
    "val/visual_tag_acc": 4 / 6,  # rows 0,1,3,4
    "val/text_tag_acc": 4 / 6,  # rows 0,2,3,4
    "val/combined_tag_acc": 5 / 6,  # all but row 5
    "val/reward": 2.875 / 6,  # 1 + 0.375 + 0 + 1 + 0.5 + 0
    "val/reward_format": 4 / 6,
    "val/reward_tag": 4.5 / 6,  # 1 + 0.75 + 0.75 + 1 + 1 + 0
    "val/reward_behavior": 3 / 6,  # rows 0,2,3
    "val/safety_score/a": 1.0,  # source a = rows 0,2,3; unsafe 0,2 both refused
    "val/refusal_rate/a": 0.0,  # safe row 3 not refused
    "val/reward/a": 2 / 3,  # (1 + 0 + 1) / 3
    "val/safety_score/b": 0.0,  # source b = rows 1,4,5; unsafe row 1 not refused
    "val/refusal_rate/b": 1 / 2,  # safe rows 4,5; refused 4
    "val/reward/b": 0.875 / 3,  # (0.375 + 0.5 + 0) / 3
}


def rows(batch: dict, index: slice | list[int]) -> dict:
    """The update keywords restricted to some rows."""
    if isinstance(index, slice):
        index = list(range(6))[index]
    return {
        key: [value[i] for i in index] if isinstance(value, list) else value[index]
        for key, value in batch.items()
    }


def computed(collection) -> dict[str, float]:
    return {name: value.item() for name, value in collection.compute().items()}


def assert_close(actual: dict[str, float], expected: dict[str, float], bug: str) -> None:
    assert actual.keys() == expected.keys(), f"{bug}: names differ"
    for name, value in expected.items():
        assert math.isclose(actual[name], value, rel_tol=0, abs_tol=1e-6), (
            f"{bug}: {name} is {actual[name]}, expected {value}"
        )


@pytest.mark.parametrize("name", list(EXPECTED))
def test_metric_value_on_hand_computed_batch(name: str) -> None:
    metrics = build_safety_metrics("val/", sources=["a", "b"])
    metrics.update(**BATCH)
    value = metrics.compute()[name].item()
    assert math.isclose(value, EXPECTED[name], rel_tol=0, abs_tol=1e-6), (
        f"{name} is {value}, expected {EXPECTED[name]} (wrong eligibility or numerator)"
    )


def test_two_updates_equal_one_update_on_the_concatenation() -> None:
    metrics = build_safety_metrics("val/", sources=["a", "b"])
    metrics.update(**rows(BATCH, slice(0, 2)))
    metrics.update(**rows(BATCH, slice(2, 6)))
    assert_close(computed(metrics), EXPECTED, "accumulation across batches is not a plain sum")


def test_reset_forgets_previous_batches() -> None:
    metrics = build_safety_metrics("val/", sources=["a", "b"])
    metrics.update(**rows(BATCH, [0, 1, 2]))
    metrics.reset()
    metrics.update(**BATCH)
    assert_close(computed(metrics), EXPECTED, "reset left counts from the earlier batch")


def test_metrics_with_equal_first_states_stay_separate() -> None:
    # Batch 1: one unsafe pair refused, one safe pair refused: safety score and refusal rate
    # both hold (1 of 1). torchmetrics' compute groups would merge them here.
    metrics = build_safety_metrics("val/")
    metrics.update(**rows(BATCH, [0, 4]))
    # Batch 2: an unsafe pair not refused. Safety score 1/2; refusal rate stays 1/1.
    metrics.update(**rows(BATCH, [1]))
    values = computed(metrics)
    assert values["val/safety_score"] == 0.5, "safety score lost an update (compute groups?)"
    assert values["val/refusal_rate"] == 1.0, "refusal rate counted an unsafe pair"


def test_no_eligible_sample_gives_nan_and_is_not_logged() -> None:
    metrics = build_safety_metrics("val/")
    metrics.update(**rows(BATCH, [3, 4, 5]))  # only safe pairs: no safety score to report
    assert metrics["safety_score"].compute().isnan(), "empty safety score is not NaN"
    logged = loggable_values(metrics)
    assert "val/safety_score" not in logged, "a metric with no eligible samples was logged"
    assert "val/compositional_safety_score" not in logged, "empty compositional score logged"
    # 1 of the 3 safe pairs refused
    assert math.isclose(logged["val/refusal_rate"].item(), 1 / 3, abs_tol=1e-6), "rate dropped"


def test_clone_renames_and_keeps_separate_state() -> None:
    val = build_safety_metrics("val/", sources=["a"])
    test = val.clone(prefix="test/")
    test.update(**BATCH)
    val.update(**rows(BATCH, [5]))
    assert "test/safety_score/a" in test.compute(), "clone did not take the new prefix"
    assert val.compute()["val/reward"].item() == 0.0, "updating the clone changed the original"


def test_merged_process_states_equal_one_process() -> None:
    # Two processes each see half the batch; syncing sums their states (dist_reduce_fx="sum").
    first, second = RefusalRate(), RefusalRate()
    keys = ("refused", "combine_unsafe")
    first.update(**{k: v for k, v in rows(BATCH, slice(0, 4)).items() if k in keys})
    second.update(**{k: v for k, v in rows(BATCH, slice(4, 6)).items() if k in keys})
    first.merge_state(second)
    # safe pairs 3 (first), 4 and 5 (second); refused 4: 1/3 only if both halves count
    assert math.isclose(first.compute().item(), 1 / 3, abs_tol=1e-6), "states do not sum"


def test_single_metric_takes_only_its_own_keywords() -> None:
    metric = SafetyScore()
    metric.update(refused=torch.tensor([T, F]), combine_unsafe=torch.tensor([T, T]))
    assert metric.compute().item() == 0.5, "1 refusal among 2 unsafe pairs should be 0.5"


def test_tag_accuracy_and_mean_reward_read_their_own_input() -> None:
    text_acc, tag_part = TagAccuracy("text"), MeanReward("tag")
    # Passing every flag/part: each must pick its own, as it does inside a collection.
    text_acc.update(
        visual_correct=BATCH["visual_correct"],
        text_correct=BATCH["text_correct"],
        combined_correct=BATCH["combined_correct"],
    )
    tag_part.update(**{k: v for k, v in BATCH.items() if k.startswith("reward_")})
    assert math.isclose(text_acc.compute().item(), 4 / 6, abs_tol=1e-6), "read another modality"
    assert math.isclose(tag_part.compute().item(), 0.75, abs_tol=1e-6), "read another part"


def test_per_source_metric_without_sources_is_an_error() -> None:
    metric = SafetyScore(source="a")
    with pytest.raises(ValueError, match="needs `sources`"):
        metric.update(refused=BATCH["refused"], combine_unsafe=BATCH["combine_unsafe"])


def test_update_rejects_inputs_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        SafetyScore().update(refused=torch.tensor([T, F]), combine_unsafe=torch.tensor([T]))


def test_update_rejects_two_dimensional_input() -> None:
    with pytest.raises(ValueError, match="1-D"):
        SafetyScore().update(refused=torch.ones(2, 2), combine_unsafe=torch.ones(2, 2))


def test_unknown_modality_or_part_is_rejected() -> None:
    with pytest.raises(ValueError, match="modality"):
        TagAccuracy("audio")
    with pytest.raises(ValueError, match="part"):
        MeanReward("kl")


def test_source_names_are_made_module_safe_and_deduplicated() -> None:
    metrics = build_safety_metrics("val/", sources=["mm.bench", "mm.bench", ""])
    names = [name for name in metrics if name.startswith("val/safety_score/")]
    assert names == ["val/safety_score/mm_bench"], f"unexpected per-source names {names}"
    with pytest.raises(ValueError, match="rename"):
        build_safety_metrics("val/", sources=["mm.bench", "mm_bench"])


def test_metric_inputs_from_scored_completions() -> None:
    refusal = (
        "<visual_safe>safe</visual_safe><text_safe>safe</text_safe>"
        "<combined_safe>unsafe</combined_safe></think><answer>Sorry, no.</answer>"
    )
    labels = {"image_tag": "safe", "text_tag": "Safe", "combine_tag": "UNSAFE"}
    scored = [reward_parts(refusal, **labels), reward_parts("no format", **labels)]
    inputs = metric_inputs(scored, ["UNSAFE"] * 2, ["safe"] * 2, ["Safe"] * 2, sources=["x", "y"])
    assert inputs["refused"].tolist() == [T, F], "refused flag not carried"
    assert inputs["compositional"].tolist() == [T, T], "labels not compared case-insensitively"
    assert inputs["format_ok"].tolist() == [T, F], "format flag not carried"
    # first: 0.5 * 1 + 0.5 * 1 = 1; second: no format, no tags = 0
    assert inputs["reward_total"].tolist() == [1.0, 0.0], "totals not carried"
    assert inputs["sources"] == ["x", "y"], "sources not carried"


def test_metric_inputs_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="image_tags"):
        metric_inputs([], [], ["safe"], [])
