"""The built-in demo set: deterministic, disjoint, labelled by its rule, learnable."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import numpy as np
import pytest

from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.demo.dataset import (
    OBJECTS,
    SOURCE_PICTURE,
    SOURCE_TYPOGRAPHIC,
    TEXT_CATEGORIES,
    TYPOGRAPHIC_PROMPTS,
    DemoConfig,
    combine_tag,
    demo_corpus,
    draw_object,
    draw_typographic,
    make_demo_splits,
)
from safegrpo_pl.demo.drawings import render_text_image
from safegrpo_pl.demo.vocab import (
    CORES,
    HELD_OUT_TYPO_FRAME,
    TYPOGRAPHIC_FRAMES,
    TYPOGRAPHIC_KEYS,
    all_instructions,
    all_typographic_phrases,
)

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
    categories = {text: cat for cat in TEXT_CATEGORIES for text in all_instructions(cat)}
    for record in default_splits["train"] + default_splits["validation"]:
        if record.source != SOURCE_PICTURE:
            continue
        category = categories[record.prompt]
        assert record.text_tag == ("unsafe" if category == "unsafe" else "safe"), record.id
        if record.is_compositional:
            assert category == "dual-use", f"{record.id}: compositional without dual-use text"


def test_dual_use_text_is_safe_with_a_benign_object(default_splits) -> None:
    dual = set(all_instructions("dual-use"))
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


def test_train_typographic_share_changes_the_train_split_only() -> None:
    sizes = dict(num_train=200, num_val=40, num_test=40)
    plain = make_demo_splits(DemoConfig(**sizes))
    more = make_demo_splits(DemoConfig(**sizes, train_typographic_fraction=0.3))
    typo = {n: sum(r.source == SOURCE_TYPOGRAPHIC for r in v) for n, v in more.items()}
    assert typo["train"] == 60, typo  # 30% of 200
    safe = [r for r in more["train"] if r.source == SOURCE_TYPOGRAPHIC and r.combine_tag == "safe"]
    assert len(safe) == 30, "half of the typographic records are safe"
    for split in ("validation", "test"):
        assert [_fingerprint(r) for r in more[split]] == [_fingerprint(r) for r in plain[split]]


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
            size = 168 if r.source == SOURCE_TYPOGRAPHIC else 64
            assert r.image.mode == "RGB" and r.image.size == (size, size), f"{r.id}: bad image"


def test_image_size_is_configurable() -> None:
    config = DemoConfig(num_train=40, num_val=0, num_test=0, image_size=32, typographic_size=144)
    records = make_demo_splits(config)["train"]
    sizes = {r.source: r.image.size for r in records}
    assert sizes == {SOURCE_PICTURE: (32, 32), SOURCE_TYPOGRAPHIC: (144, 144)}, f"sizes {sizes}"


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
    # so a model can only learn the tag from the words. The top-left 6x6 px is never inked
    # (the three lines take the lower three of four token rows; the text starts at x >= 2).
    unsafe_lines = ("HOW TO", *TYPOGRAPHIC_KEYS["unsafe"][0])
    safe_lines = ("HOW TO", *TYPOGRAPHIC_KEYS["safe"][0])
    unsafe = draw_typographic(unsafe_lines, 112, random.Random(7))
    safe = draw_typographic(safe_lines, 112, random.Random(7))
    corner_u = np.asarray(unsafe)[:6, :6]
    corner_s = np.asarray(safe)[:6, :6]
    assert np.array_equal(corner_u, corner_s), "background depends on the phrase's safety"
    assert unsafe.tobytes() != safe.tobytes(), "the phrase was not drawn"


def _typo_features(records: list[SafetyRecord]) -> tuple[np.ndarray, np.ndarray]:
    # Grey pixels pooled to 28x28: 4 px per cell, the size of one 14 px patch split in 2x2.
    pixels = [
        np.asarray(r.image.convert("L").resize((28, 28)), dtype=np.float64) / 255 for r in records
    ]
    x = np.array([[*p.ravel(), 1.0] for p in pixels])
    y = np.array([1.0 if r.image_tag == "unsafe" else -1.0 for r in records])
    return x, y


def test_typographic_safety_is_readable_and_carries_to_unseen_words() -> None:
    # Learnable from the pixels at the encoder's patch scale, and the reading generalises: a
    # ridge classifier fitted on training phrases tells held-out phrases (unseen frame words,
    # unseen combinations) apart. The layout carries no tag, so this is the words being read.
    config = DemoConfig(num_train=1000, num_val=400, num_test=0, typographic_fraction=1.0)
    splits = make_demo_splits(config)
    x_train, y_train = _typo_features(splits["train"])
    x_held, y_held = _typo_features(splits["validation"])
    weights = np.linalg.solve(x_train.T @ x_train + np.eye(x_train.shape[1]), x_train.T @ y_train)
    accuracy = float(np.mean(np.sign(x_held @ weights) == y_held))
    assert accuracy >= 0.9, f"held-out typographic safety read only {accuracy:.2f} of the time"


# -- the held-out splits test generalisation --------------------------------------------------


def _object(record: SafetyRecord) -> str:
    """What the image shows: the object's name, or the rendered phrase (from the caption)."""
    return record.caption


def _core(instruction: str) -> str:
    (core,) = [c for cores in CORES.values() for c in cores if c.lower() in instruction.lower()]
    return core


def test_no_held_out_object_instruction_pair_occurs_in_train(default_splits) -> None:
    train = {(_object(r), r.prompt) for r in default_splits["train"]}
    for split in ("validation", "test"):
        records = default_splits[split]
        repeats = [r.id for r in records if (_object(r), r.prompt) in train]
        assert not repeats, f"{split}: {len(repeats)} (object, instruction) pairs seen in train"


def test_unseen_pairs_put_known_parts_together_for_the_first_time(default_splits) -> None:
    train = [r for r in default_splits["train"] if r.source == SOURCE_PICTURE]
    meanings = {(_object(r), _core(r.prompt)) for r in train}
    objects, prompts = {_object(r) for r in train}, {r.prompt for r in train}
    for split in ("validation", "test"):
        for r in default_splits[split]:
            if r.source != SOURCE_PICTURE or r.novelty != "unseen-pair":
                continue
            assert _object(r) in objects and r.prompt in prompts, f"{r.id}: a part is new"
            # stronger than the pair: training never asks this object this request in any wording
            assert (_object(r), _core(r.prompt)) not in meanings, f"{r.id}: request seen with it"


def test_unseen_wordings_keep_a_known_meaning(default_splits) -> None:
    train_prompts = {r.prompt for r in default_splits["train"]}
    train_cores = {_core(p) for p in train_prompts if p not in TYPOGRAPHIC_PROMPTS}
    for r in default_splits["validation"] + default_splits["test"]:
        if r.source == SOURCE_PICTURE and r.novelty == "unseen-wording":
            assert r.prompt not in train_prompts, f"{r.id}: wording {r.prompt!r} seen in train"
            assert _core(r.prompt) in train_cores, f"{r.id}: its meaning never trained"


def _phrase_words(record: SafetyRecord) -> list[str]:
    return record.caption.removeprefix("The image says: ").rstrip(".").split()


def test_held_out_typographic_phrases_are_new_but_their_deciding_words_are_not(
    default_splits,
) -> None:
    train = [r for r in default_splits["train"] if r.source == SOURCE_TYPOGRAPHIC]
    train_words = {word for r in train for word in _phrase_words(r)}
    assert HELD_OUT_TYPO_FRAME.split()[0] not in train_words, "the new frame word is in train"
    held = [
        r
        for split in ("validation", "test")
        for r in default_splits[split]
        if r.source == SOURCE_TYPOGRAPHIC
    ]
    kinds = Counter(r.novelty for r in held)
    assert kinds["unseen-pair"] and kinds["unseen-wording"], f"held-out kinds {kinds}"
    for r in held:
        key_words = _phrase_words(r)[2:]
        assert set(key_words) <= train_words, f"{r.id}: deciding words {key_words} never trained"
        if r.novelty == "unseen-wording":
            assert HELD_OUT_TYPO_FRAME in r.caption, f"{r.id}: no unseen words"


def test_every_split_is_labelled_with_its_kind_of_novelty(default_splits) -> None:
    assert {r.novelty for r in default_splits["train"]} == {""}, "train records marked novel"
    for split in ("validation", "test"):
        for source in (SOURCE_PICTURE, SOURCE_TYPOGRAPHIC):
            kinds = {r.novelty for r in default_splits[split] if r.source == source}
            assert kinds == {"unseen-pair", "unseen-wording"}, f"{split}/{source}: {kinds}"


def test_typographic_vocabulary_is_parallel() -> None:
    # Same number of phrases per safety, same frames: only the deciding words differ.
    unsafe, safe = all_typographic_phrases("unsafe"), all_typographic_phrases("safe")
    assert len(unsafe) == len(safe) == 3 * (len(TYPOGRAPHIC_FRAMES) + 1)
    assert Counter(p[0] for p in unsafe) == Counter(p[0] for p in safe), "frames differ"


def test_corpus_holds_every_template() -> None:
    corpus = "\n".join(demo_corpus())
    for text in [*TYPOGRAPHIC_PROMPTS, *(t for c in TEXT_CATEGORIES for t in all_instructions(c))]:
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
    "kwargs",
    [
        {"num_train": -1},
        {"image_size": 8},
        {"typographic_fraction": 1.5},
        {"train_typographic_fraction": -0.1},
        {"typographic_size": 64, "typographic_scale": 2},
    ],
)
def test_bad_config_is_rejected(kwargs) -> None:
    with pytest.raises(ValueError, match="DemoConfig"):
        DemoConfig(**kwargs)


@pytest.mark.parametrize(
    ("size", "scale", "rows_per_line", "first_row"), [(168, 3, 2, 0), (112, 2, 1, 1)]
)
def test_each_typographic_line_has_token_rows_of_its_own(size, scale, rows_per_line, first_row):
    # Merged tokens are 28 px: 168 px (the default) has 6 rows, two per line; 112 px has 4, one
    # per line, the first left empty. Each line is inked inside its own rows, never across a
    # boundary, whatever the jitter draws: a new frame line leaves the key's tokens as they were.
    lines = ("TIPS TO", *TYPOGRAPHIC_KEYS["unsafe"][1])
    band = 28 * rows_per_line
    for seed in range(12):
        image = draw_typographic(lines, size, random.Random(seed), scale, jitter=1)
        inked = np.flatnonzero((np.asarray(image.convert("L")) < 100).any(axis=1))
        for i in range(3):
            top = 28 * first_row + i * band
            rows = inked[(inked >= top) & (inked < top + band)]
            assert rows.size and rows.min() > top and rows.max() < top + band - 1, (seed, i)
        assert inked.min() >= 28 * first_row and inked.max() < 28 * first_row + 3 * band, seed
    other = draw_typographic(("HOW TO", *lines[1:]), size, random.Random(3), scale, jitter=1)
    same = draw_typographic(lines, size, random.Random(3), scale, jitter=1)
    key = np.s_[28 * first_row + band : 28 * first_row + 3 * band]
    frame = np.s_[28 * first_row : 28 * first_row + band]
    assert np.array_equal(np.asarray(other)[key], np.asarray(same)[key])
    assert not np.array_equal(np.asarray(other)[frame], np.asarray(same)[frame])
