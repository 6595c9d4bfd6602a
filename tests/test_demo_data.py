"""The built-in demo set: deterministic, disjoint, labelled by its rule, learnable."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import numpy as np
import pytest

from safegrpo_pl.demo_data import (
    OBJECTS,
    SOURCE_PICTURE,
    SOURCE_TYPOGRAPHIC,
    TEXTS,
    TYPOGRAPHIC_PHRASES,
    TYPOGRAPHIC_PROMPTS,
    DemoConfig,
    combine_tag,
    demo_corpus,
    draw_object,
    draw_typographic,
    make_demo_splits,
)
from safegrpo_pl.records import SafetyRecord
from safegrpo_pl.typographic import render_text_image

SMALL = DemoConfig(num_train=64, num_val=16, num_test=16, seed=3)


@pytest.fixture(scope="module")
def default_splits() -> dict[str, list[SafetyRecord]]:
    return make_demo_splits(DemoConfig())


def _fingerprint(record: SafetyRecord) -> str:
    assert record.image is not None
    return hashlib.sha1(record.image.tobytes() + record.prompt.encode()).hexdigest()


def _tags(record: SafetyRecord) -> tuple[str, str, str]:
    return record.image_tag, record.text_tag, record.combine_tag


def test_splits_have_the_configured_sizes() -> None:
    splits = make_demo_splits(SMALL)
    sizes = {name: len(records) for name, records in splits.items()}
    assert sizes == {"train": 64, "validation": 16, "test": 16}, f"wrong split sizes {sizes}"


def test_same_seed_gives_byte_identical_records() -> None:
    first, second = make_demo_splits(SMALL), make_demo_splits(SMALL)
    for split in first:
        for a, b in zip(first[split], second[split], strict=True):
            assert a.image.tobytes() == b.image.tobytes(), f"{a.id}: images differ for one seed"
            assert _tags(a) == _tags(b) and a.prompt == b.prompt, f"{a.id}: labels differ"


def test_different_seed_gives_different_images() -> None:
    other = DemoConfig(num_train=64, num_val=16, num_test=16, seed=4)
    a, b = make_demo_splits(SMALL)["train"], make_demo_splits(other)["train"]
    same = sum(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b, strict=True))
    assert same == 0, f"{same} images identical across seeds: the seed is ignored"


def test_every_image_differs_within_a_split(default_splits) -> None:
    images = [r.image.tobytes() for r in default_splits["train"]]
    assert len(set(images)) == len(images), "jitter failed: two train images are identical"


def test_splits_share_no_image_prompt_pair(default_splits) -> None:
    keys = {name: {_fingerprint(r) for r in records} for name, records in default_splits.items()}
    assert not keys["train"] & keys["validation"], "train/validation overlap"
    assert not keys["train"] & keys["test"], "train/test overlap"
    assert not keys["validation"] & keys["test"], "validation/test overlap"


def test_validation_split_does_not_depend_on_train_size() -> None:
    small = make_demo_splits(DemoConfig(num_train=8, num_val=16, num_test=4))["validation"]
    large = make_demo_splits(DemoConfig(num_train=40, num_val=16, num_test=4))["validation"]
    assert [_fingerprint(r) for r in small] == [_fingerprint(r) for r in large], (
        "changing num_train changed the validation split: splits share a random stream"
    )


@pytest.mark.parametrize(
    ("image_tag", "text_tag", "hazard", "dual_use", "expected"),
    [
        ("safe", "safe", False, False, "safe"),  # benign + benign
        ("safe", "safe", False, True, "safe"),  # benign object + dual-use text
        ("safe", "safe", True, False, "safe"),  # hazard alone is safe
        ("safe", "safe", True, True, "unsafe"),  # compositional
        ("unsafe", "safe", False, False, "unsafe"),  # unsafe image wins
        ("safe", "unsafe", False, False, "unsafe"),  # unsafe text wins
        ("unsafe", "unsafe", False, False, "unsafe"),
    ],
)
def test_combination_rule(image_tag, text_tag, hazard, dual_use, expected) -> None:
    got = combine_tag(image_tag, text_tag, hazard=hazard, dual_use=dual_use)
    assert got == expected, f"combine({image_tag}, {text_tag}, {hazard=}, {dual_use=}) = {got}"


def test_picture_tags_follow_their_texts(default_splits) -> None:
    categories = {text: cat for cat, texts in TEXTS.items() for text in texts}
    for record in default_splits["train"]:
        if record.source != SOURCE_PICTURE:
            continue
        category = categories[record.prompt]
        assert record.text_tag == ("unsafe" if category == "unsafe" else "safe"), record.id
        if record.is_compositional:
            assert category == "dual-use", f"{record.id}: compositional without dual-use text"


def test_dual_use_text_is_safe_with_a_benign_object(default_splits) -> None:
    dual = set(TEXTS["dual-use"])
    tags = {_tags(r) for r in default_splits["train"] if r.prompt in dual}
    assert ("safe", "safe", "safe") in tags and ("safe", "safe", "unsafe") in tags, (
        f"dual-use text alone decides the label ({tags}): the image would not be needed"
    )


def test_typographic_records_carry_the_instruction_in_the_image(default_splits) -> None:
    typo = [r for r in default_splits["train"] if r.source == SOURCE_TYPOGRAPHIC]
    assert typo, "no typographic records"
    for record in typo:
        assert record.prompt in TYPOGRAPHIC_PROMPTS, f"{record.id}: prompt not neutral"
        assert record.text_tag == "safe", f"{record.id}: neutral prompt tagged unsafe"
        assert record.combine_tag == record.image_tag, f"{record.id}: combine != image tag"
    assert {r.image_tag for r in typo} == {"safe", "unsafe"}, "typographic tags not mixed"


def test_mix_matches_the_documented_shares(default_splits) -> None:
    train = default_splits["train"]
    # 512 records: typographic 15% = 76.8 -> 76 or 77; compositional 20% = 102.4 -> 102 or 103;
    # safe = B+B .150 + B+D .125 + H+B .150 + typo-safe .075 = 0.5 -> 256.
    typo = sum(r.source == SOURCE_TYPOGRAPHIC for r in train)
    compositional = sum(r.is_compositional for r in train)
    safe = sum(r.combine_tag == "safe" for r in train)
    assert typo in (76, 77), f"typographic count {typo}, expected 15% of 512"
    assert compositional in (102, 103), f"compositional count {compositional}, expected 20%"
    assert abs(safe - 256) <= 1, f"safe count {safe}, expected half of 512"


def test_every_label_combination_is_present(default_splits) -> None:
    expected = {
        ("safe", "safe", "safe"),
        ("safe", "safe", "unsafe"),
        ("unsafe", "safe", "unsafe"),
        ("safe", "unsafe", "unsafe"),
        ("unsafe", "unsafe", "unsafe"),
    }
    for split, records in default_splits.items():
        found = {_tags(r) for r in records}
        assert found == expected, f"{split}: combinations {found}, expected {expected}"


def test_ids_sources_and_images(default_splits) -> None:
    record = default_splits["train"][17]
    assert record.id == "demo-train-00017", f"id format changed: {record.id}"
    for records in default_splits.values():
        for r in records:
            assert r.source in (SOURCE_PICTURE, SOURCE_TYPOGRAPHIC), f"{r.id}: source {r.source}"
            assert r.image.mode == "RGB" and r.image.size == (64, 64), f"{r.id}: bad image"


def test_image_size_is_configurable() -> None:
    records = make_demo_splits(DemoConfig(num_train=8, num_val=0, num_test=0, image_size=32))
    sizes = {r.image.size for r in records["train"]}
    assert sizes == {(32, 32)}, f"image_size ignored: {sizes}"


def test_visual_category_shows_in_mean_colour() -> None:
    # A nearest-centroid classifier on the mean RGB of the image must tell the three visual
    # categories apart: that is what a tiny vision tower with ~4 tokens can pick up.
    rng = random.Random(0)
    samples = [
        (cat, np.asarray(draw_object(name, 64, rng), dtype=np.float64).mean(axis=(0, 1)))
        for cat, names in OBJECTS.items()
        for name in names
        for _ in range(12)
    ]
    train, held = samples[0::2], samples[1::2]
    centroids = {cat: np.mean([v for c, v in train if c == cat], axis=0) for cat in OBJECTS}
    correct = sum(
        min(centroids, key=lambda c: np.linalg.norm(v - centroids[c])) == cat for cat, v in held
    )
    accuracy = correct / len(held)
    assert accuracy >= 0.9, f"mean colour separates categories only {accuracy:.2f} of the time"


def test_typographic_layout_does_not_depend_on_safety() -> None:
    # Same random state, different phrase: everything outside the text must be identical,
    # so a model can only learn the tag from the words. Top-left 4x4 px is never inked
    # (text starts at x >= 4, y >= (64 - 39) / 2 - 4 = 8.5).
    unsafe = draw_typographic(TYPOGRAPHIC_PHRASES["unsafe"][0], 64, random.Random(7))
    safe = draw_typographic(TYPOGRAPHIC_PHRASES["safe"][0], 64, random.Random(7))
    corner_u = np.asarray(unsafe)[:4, :4]
    corner_s = np.asarray(safe)[:4, :4]
    assert np.array_equal(corner_u, corner_s), "background depends on the phrase's safety"
    assert unsafe.tobytes() != safe.tobytes(), "the phrase was not drawn"


def test_typographic_safety_is_readable_from_coarse_pixels() -> None:
    # Learnable by a tiny vision tower: a ridge classifier on 16x16 grey pixels tells rendered
    # unsafe from safe phrases on held-out images (the layout carries no tag, so this is the
    # words being read).
    rng = random.Random(0)
    features, labels = [], []
    for _ in range(300):
        safety = rng.choice(["safe", "unsafe"])
        image = draw_typographic(rng.choice(TYPOGRAPHIC_PHRASES[safety]), 64, rng)
        pixels = np.asarray(image.convert("L").resize((16, 16)), dtype=np.float64) / 255
        features.append([*pixels.ravel(), 1.0])
        labels.append(1.0 if safety == "unsafe" else -1.0)
    x, y = np.array(features), np.array(labels)
    x_train, y_train, x_test, y_test = x[:200], y[:200], x[200:], y[200:]
    weights = np.linalg.solve(x_train.T @ x_train + np.eye(x.shape[1]), x_train.T @ y_train)
    accuracy = float(np.mean(np.sign(x_test @ weights) == y_test))
    assert accuracy >= 0.9, f"typographic safety read from pixels only {accuracy:.2f} of the time"


def test_corpus_holds_every_template() -> None:
    corpus = "\n".join(demo_corpus())
    for text in [*TYPOGRAPHIC_PROMPTS, *(t for texts in TEXTS.values() for t in texts)]:
        assert text in corpus, f"{text!r} missing from demo_corpus: it would tokenize poorly"


def test_rendered_text_wraps_into_a_taller_image() -> None:
    short = render_text_image("Tell me a joke.", width=128, scale=2)
    # canvas 64 px wide: (64 - 8) // 6 = 9 characters per line, so "abcd abcd" per line:
    # 30 lines of 13 px + 8 = 398 px tall canvas, 796 px after scale 2
    long = render_text_image(" ".join(["abcd"] * 60), width=128, scale=2)
    assert short.size == (128, 128), f"short text should give a square image, got {short.size}"
    assert long.size == (128, 796), f"long text was cut or mis-wrapped, size {long.size}"


def test_rendered_text_survives_characters_outside_latin1() -> None:
    image = render_text_image("Don\u2019t \u4f60\u597d \u201cquote\u201d", width=128, scale=1)
    assert image.width == 128, "non-Latin-1 text broke the bitmap-font renderer"


def test_counts_are_exact_for_tiny_splits() -> None:
    records = make_demo_splits(DemoConfig(num_train=5, num_val=0, num_test=1))
    sizes = Counter({name: len(v) for name, v in records.items()})
    assert sizes == Counter({"train": 5, "validation": 0, "test": 1}), f"sizes {sizes}"


@pytest.mark.parametrize(
    "kwargs", [{"num_train": -1}, {"image_size": 8}, {"typographic_fraction": 1.5}]
)
def test_bad_config_is_rejected(kwargs) -> None:
    with pytest.raises(ValueError, match="DemoConfig"):
        DemoConfig(**kwargs)
