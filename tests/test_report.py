"""The fit report: figures computed like the logged metrics, files written with the right keys."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from safegrpo_pl.core.prompts import HELPFUL_ANSWERS, REFUSAL_ANSWERS, format_response
from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.core.rewards import score_completions
from safegrpo_pl.run.curves import TrainingHistory, moving_average
from safegrpo_pl.run.provenance import code_version, describe
from safegrpo_pl.run.report import (
    SUMMARY_KEYS,
    EvalSummary,
    parse_target,
    summarize_by_novelty,
    summarize_by_source,
    summarize_evaluation,
    summary_markdown,
    target_met,
    write_report,
)

REFUSE = REFUSAL_ANSWERS[0]
HELP = HELPFUL_ANSWERS[0]


def _record(
    image_tag: str, text_tag: str, combine_tag: str, source: str = "default"
) -> SafetyRecord:
    return SafetyRecord(
        image=None,
        prompt="p",
        image_tag=image_tag,
        text_tag=text_tag,
        combine_tag=combine_tag,
        source=source,
    )


def _response(visual: str, text: str, combined: str, answer: str) -> str:
    return format_response(visual=visual, text=text, combined=combined, answer=answer)


def _scored(rows: list[tuple[SafetyRecord, str]]):
    records = [r for r, _ in rows]
    parts = score_completions(
        [t for _, t in rows],
        [r.image_tag for r in records],
        [r.text_tag for r in records],
        [r.combine_tag for r in records],
    )
    return parts, records


def test_summary_counts_refusals_per_kind_of_pair():
    parts, records = _scored(
        [
            # unsafe image, unsafe pair, all tags right, refuses: reward 1
            (_record("unsafe", "safe", "unsafe"), _response("unsafe", "safe", "unsafe", REFUSE)),
            # compositional pair, combined tag right but visual/text wrong, refuses: 0.5*0.5 + 0.5 = 0.75
            (_record("safe", "safe", "unsafe"), _response("unsafe", "unsafe", "unsafe", REFUSE)),
            # compositional pair answered helpfully, tags all "safe": combined wrong, reward 0
            (_record("safe", "safe", "unsafe"), _response("safe", "safe", "safe", HELP)),
            # safe pair refused although tagged safe: tag 1.0, behaviour 0 -> 0.5
            (_record("safe", "safe", "safe"), _response("safe", "safe", "safe", REFUSE)),
        ]
    )
    summary = summarize_evaluation(parts, records)
    # mean reward (1 + 0.75 + 0 + 0.5) / 4 = 0.5625
    assert summary.mean_reward == pytest.approx(0.5625, abs=1e-6)
    # unsafe pairs: rows 1-3, refused 2 of 3
    assert summary.safety_score == pytest.approx(2 / 3, abs=1e-6)
    # safe pairs: row 4 only, refused
    assert summary.refusal_rate == pytest.approx(1.0, abs=1e-6)
    # compositional: rows 2-3, refused 1 of 2
    assert summary.compositional_safety_score == pytest.approx(0.5, abs=1e-6)
    assert summary.format_rate == pytest.approx(1.0, abs=1e-6)
    # visual tag right on rows 1, 3 and 4 (row 2 says unsafe for a safe image): 3/4
    assert summary.visual_tag_acc == pytest.approx(0.75, abs=1e-6)
    assert summary.num_records == 4


def test_summary_without_eligible_pairs_is_none_not_zero():
    parts, records = _scored(
        [
            (_record("safe", "safe", "safe"), _response("safe", "safe", "safe", HELP)),
        ]
    )
    summary = summarize_evaluation(parts, records)
    assert summary.safety_score is None, "no unsafe pair: a 0% safety score would be a lie"
    assert summary.compositional_safety_score is None
    assert summary.refusal_rate == 0.0


def test_summary_rejects_misaligned_inputs():
    parts, records = _scored(
        [
            (_record("safe", "safe", "safe"), _response("safe", "safe", "safe", HELP)),
        ]
    )
    with pytest.raises(ValueError, match="one response per record"):
        summarize_evaluation(parts, records + records)


def test_by_source_splits_the_figures_and_writes_a_table(tmp_path):
    unsafe, safe = ("unsafe", "safe", "unsafe"), ("safe", "safe", "safe")
    parts, records = _scored(
        [
            # pictures: both right (reward 1 each)
            (_record(*unsafe, source="picture"), _response(*unsafe, REFUSE)),
            (_record(*safe, source="picture"), _response(*safe, HELP)),
            # typographic: an unsafe pair answered with every tag "safe" (reward 0), a safe pair
            # refused with every tag "unsafe" (reward 0)
            (_record(*unsafe, source="typographic"), _response(*safe, HELP)),
            (_record(*safe, source="typographic"), _response(*unsafe, REFUSE)),
        ]
    )
    by_source = summarize_by_source(parts, records)
    assert list(by_source) == ["picture", "typographic"]
    picture, typographic = by_source["picture"], by_source["typographic"]
    assert (picture.num_records, picture.mean_reward, picture.safety_score) == (2, 1.0, 1.0)
    assert picture.refusal_rate == 0.0
    assert (typographic.mean_reward, typographic.safety_score) == (0.0, 0.0)
    assert typographic.refusal_rate == 1.0
    # the overall figure is the records' mean, so it sits between the two
    assert summarize_evaluation(parts, records).mean_reward == pytest.approx(0.5)

    pairs = {source: (summary, summary) for source, summary in by_source.items()}
    before, after = _summaries()
    files = write_report(
        tmp_path, before, after, _history(), wall_time_s=1.0, steps=2, by_source=pairs
    )
    markdown = files.markdown.read_text()
    assert "| typographic | 2 | 0.000 → 0.000 | 0.0% → 0.0% | 100.0% → 100.0% |" in markdown
    payload = json.loads(files.json.read_text())
    assert payload["by_source"]["picture"]["after"]["mean_reward"] == 1.0
    assert payload["by_source"]["typographic"]["before"]["refusal_rate"] == 1.0


def test_moving_average_is_trailing_and_keeps_length():
    # window 2: [1, (1+3)/2, (3+5)/2, (5+7)/2]
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize(
    ("spec", "value", "met"),
    [
        (">= 0.9", 0.9, True),
        (">= 0.9", 0.89, False),
        ("<= 0.05", 0.05, True),
        ("<=0.05", 0.06, False),
        (">= 0.9", None, None),
    ],
)
def test_targets_compare_inclusively(spec, value, met):
    assert target_met(value, spec) is met


def test_a_figure_not_measured_is_n_a_not_a_missed_target():
    before, after = _summaries()
    after = replace(after, compositional_safety_score=None)
    text = summary_markdown(
        before,
        after,
        wall_time_s=1.0,
        steps=1,
        targets={"compositional_safety_score": ">= 0.5", "mean_reward": ">= 0.99"},
    )
    (row,) = [x for x in text.splitlines() if x.startswith("| compositional")]
    assert row.endswith("| n/a | ≥ 50% | n/a |"), f"n/a is not a miss: {row}"
    (row,) = [x for x in text.splitlines() if x.startswith("| mean reward")]
    assert row.endswith("| NO |"), "a measured figure short of its target is still a miss"


def test_target_without_an_operator_is_refused():
    with pytest.raises(ValueError, match=">= number"):
        parse_target("0.9")


def _summaries() -> tuple[EvalSummary, EvalSummary]:
    before = EvalSummary(
        mean_reward=0.3,
        safety_score=0.5,
        refusal_rate=0.5,
        compositional_safety_score=0.4,
        format_rate=1.0,
        num_records=8,
    )
    after = EvalSummary(
        mean_reward=0.95,
        safety_score=1.0,
        refusal_rate=0.0,
        compositional_safety_score=1.0,
        format_rate=1.0,
        num_records=8,
    )
    return before, after


def _history() -> TrainingHistory:
    history = TrainingHistory()
    for step in range(1, 21):
        history.train.append(
            {
                "step": step,
                "train/reward": step / 20,
                "train/reward_format": 1.0,
                "train/reward_tag": step / 25,
                "train/reward_behavior": step / 30,
                "train/kl": step / 1000,
            }
        )
    history.val = [
        {"step": 0, "val/safety_score": 0.5, "val/refusal_rate": 0.5},
        {"step": 20, "val/safety_score": 1.0, "val/refusal_rate": 0.0},
    ]
    return history


def test_report_files_have_the_promised_keys(tmp_path):
    before, after = _summaries()
    files = write_report(
        tmp_path / "report",
        before,
        after,
        _history(),
        wall_time_s=12.5,
        steps=20,
        targets={"safety_score": ">= 0.95"},
    )
    payload = json.loads(files.json.read_text())
    assert {"before", "after", "wall_time_s"} <= set(payload)
    for side in ("before", "after"):
        missing = set(SUMMARY_KEYS) - set(payload[side])
        assert not missing, f"summary.json {side} lacks {missing}"
        assert all(0.0 <= payload[side][k] <= 1.0 for k in SUMMARY_KEYS), payload[side]
    assert payload["wall_time_s"] == 12.5
    assert payload["code"] == code_version(), "summary.json must name the code that ran"
    assert files.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "curves.png is not a PNG"
    markdown = files.markdown.read_text()
    assert f"Code: {describe(code_version())}." in markdown
    assert "| compositional pairs refused (both parts safe, pair unsafe) | 40.0% | 100.0%" in (
        markdown
    ), "the compositional line is missing from summary.md"
    assert "| ≥ 95% | yes |" in markdown


def test_markdown_marks_a_missed_target():
    before, after = _summaries()
    text = summary_markdown(
        before, after, wall_time_s=1.0, steps=20, targets={"mean_reward": ">= 0.99"}
    )
    # after = 0.95 < 0.99
    assert "| mean reward | 0.300 | 0.950 | ≥ 0.99 | NO |" in text


def test_unknown_target_name_is_refused(tmp_path):
    before, after = _summaries()
    with pytest.raises(ValueError, match="unknown figure"):
        write_report(
            tmp_path,
            before,
            after,
            _history(),
            wall_time_s=1.0,
            steps=1,
            targets={"safety": ">= 0.9"},
        )


def test_by_novelty_splits_seen_from_unseen_combinations(tmp_path):
    unsafe = ("unsafe", "safe", "unsafe")
    right, wrong = _response(*unsafe, REFUSE), _response("safe", "safe", "safe", HELP)
    rows = [(_record(*unsafe), right), (_record(*unsafe), right), (_record(*unsafe), wrong)]
    parts, records = _scored(rows)
    assert summarize_by_novelty(parts, records) == {}, "no record says: no table"
    records = [
        records[0],  # says nothing: a seen combination
        SafetyRecord(None, "p", *unsafe, novelty="unseen-pair"),
        SafetyRecord(None, "p", *unsafe, novelty="unseen-wording"),
    ]
    by_novelty = summarize_by_novelty(parts, records)
    assert list(by_novelty) == ["seen", "unseen-pair", "unseen-wording"]
    assert by_novelty["unseen-pair"].mean_reward == 1.0
    assert by_novelty["unseen-wording"].mean_reward == 0.0
    before, after = _summaries()
    pairs = {kind: (summary, summary) for kind, summary in by_novelty.items()}
    files = write_report(
        tmp_path, before, after, _history(), wall_time_s=1.0, steps=2, by_novelty=pairs
    )
    assert "| unseen-wording | 1 | 0.000 → 0.000 |" in files.markdown.read_text()
    payload = json.loads(files.json.read_text())
    assert payload["by_novelty"]["unseen-pair"]["after"]["mean_reward"] == 1.0
    assert set(payload["by_novelty"]["seen"]["after"]) == set(payload["after"])
