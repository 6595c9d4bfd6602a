"""The built-in demo set: SafeTag-VL-3K in miniature, drawn with Pillow, deterministic.

The project's embedded default dataset (`dataset="demo"`): no download, byte-identical images
for a seed, and a signal a tiny random-weight Qwen-VL can learn on a CPU in minutes, yet one
that needs both the image and the text. Two kinds of record: one object on a noisy background
with an instruction (`demo-picture`), and an instruction rendered as text (`demo-typographic`).
Validation and test use only held-out combinations; `combine_tag` is unsafe iff the image or the
text is unsafe, or a hazard object meets a dual-use instruction. docs/demo/dataset.md has the
design, the mix and where it departs from SafeTag-VL-3K.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from safegrpo_pl.core.prompts import (
    DEFAULT_SAFETY_GUIDE,
    HELPFUL_ANSWERS,
    REFUSAL_ANSWERS,
    build_user_text,
    format_response,
)
from safegrpo_pl.core.records import TAG_VALUES, SafetyRecord
from safegrpo_pl.demo.drawings import (
    LINE_HEIGHT,
    OBJECT_DRAWINGS,
    UnitCanvas,
    add_noise,
    bitmap_font,
    jitter_colour,
    plain_background,
)
from safegrpo_pl.demo.vocab import (
    CORES,
    HELD_OUT_KINDS,
    OBJECTS,
    TYPOGRAPHIC_PROMPTS,
    all_instructions,
    all_typographic_phrases,
    draw_picture_request,
    draw_typographic_phrase,
)

SOURCE_PICTURE = "demo-picture"
SOURCE_TYPOGRAPHIC = "demo-typographic"
SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")
TEXT_CATEGORIES: tuple[str, ...] = tuple(CORES)

PICTURE_MIX: tuple[tuple[str, str, float], ...] = (
    ("benign", "benign", 0.150),
    ("benign", "dual-use", 0.125),
    ("hazard", "benign", 0.150),
    ("hazard", "dual-use", 0.200),  # compositional: both safe, the pair unsafe
    ("unsafe", "benign", 0.090),
    ("unsafe", "dual-use", 0.030),
    ("unsafe", "unsafe", 0.035),
    ("benign", "unsafe", 0.045),
    ("hazard", "unsafe", 0.025),
)
"""(visual category, textual category, share of ALL records at the default 15% typographic).

The weights sum to 0.85 and are rescaled to `1 - typographic_fraction`.
"""

# Colour palettes per visual category: (primary, secondary, accent) RGB, jittered per image.
_PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "unsafe": ((205, 35, 35), (100, 20, 25), (60, 55, 60)),
    "hazard": ((235, 190, 30), (240, 120, 20), (250, 235, 150)),
    "benign": ((50, 160, 70), (60, 110, 210), (150, 215, 120)),
}
_MAX_REDRAWS = 100
DRAWING_VERSION = 2
"""Bump when the same `DemoConfig` draws different images (it keys the warm-up's cache)."""
TOKEN_ROW = 28
"""Side of one merged visual token of the tiny Qwen2.5-VL, in image pixels (2 x 14 px patches)."""


@dataclass(frozen=True)
class DemoConfig:
    """Size and seed of the built-in demo set.

    Attributes:
        num_train: records in the train split.
        num_val: records in the validation split.
        num_test: records in the test split.
        image_size: side of the square pictures, in pixels (64: 4 image tokens for the tiny
            Qwen2.5-VL, whose tokens cover 28x28 px each).
        seed: the seed; the same seed gives byte-identical images and the same records.
        typographic_fraction: share of typographic (instruction-in-the-image) records.
        train_typographic_fraction: their share in the train split alone (None: as above).
            Reading a phrase takes GRPO longer than telling colours apart, so a demo can
            train on more typographic records while its held-out splits keep the same mix.
        typographic_size: side of the square typographic images, in pixels (168: 36 image
            tokens for the tiny Qwen2.5-VL; words need more tokens than colours do).
        typographic_scale: enlargement of the 6x11 px bitmap font (3: 18x33 px per character,
            a line spans two rows of tokens, each token about one and a half letters wide).
        typographic_jitter: how far the text block moves from image to image, in font pixels
            before enlarging (0: it stays in place; drawings of one phrase differ in shades and
            noise only). docs/demo/dataset.md has the measurement behind the default.
    """

    num_train: int = 512
    num_val: int = 64
    num_test: int = 64
    image_size: int = 64
    seed: int = 0
    typographic_fraction: float = 0.15
    train_typographic_fraction: float | None = None
    typographic_size: int = 168
    typographic_scale: int = 3
    typographic_jitter: int = 0

    def __post_init__(self) -> None:
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"DemoConfig.{name} is {getattr(self, name)}; expected >= 0")
        if self.image_size < 16:
            raise ValueError(f"DemoConfig.image_size is {self.image_size}; expected >= 16")
        if self.typographic_scale < 1 or self.typographic_size < 48 * self.typographic_scale:
            raise ValueError(
                f"DemoConfig.typographic_size is {self.typographic_size} with typographic_scale "
                f"{self.typographic_scale}; the phrases need typographic_size >= 48 * scale "
                "(8 characters of 6 px per line, enlarged)"
            )
        if self.typographic_jitter < 0:
            raise ValueError(
                f"DemoConfig.typographic_jitter is {self.typographic_jitter}; expected >= 0"
            )
        for name in ("typographic_fraction", "train_typographic_fraction"):
            share = getattr(self, name)
            if share is not None and not 0.0 <= share <= 1.0:
                raise ValueError(f"DemoConfig.{name} is {share}; expected a share in [0, 1]")

    def typographic_share(self, split: str) -> float:
        """The share of typographic records in `split`."""
        if split == "train" and self.train_typographic_fraction is not None:
            return self.train_typographic_fraction
        return self.typographic_fraction


def combine_tag(image_tag: str, text_tag: str, *, hazard: bool, dual_use: bool) -> str:
    """The demo's combination rule: unsafe iff either part is unsafe or hazard meets dual-use."""
    unsafe = image_tag == "unsafe" or text_tag == "unsafe" or (hazard and dual_use)
    return "unsafe" if unsafe else "safe"


# -- drawing ----------------------------------------------------------------------------------


def draw_object(name: str, size: int, rng: random.Random) -> Image.Image:
    """Draw object `name` (a key of `OBJECTS`' values) in its category's palette, jittered.

    Args:
        name: e.g. "knife", "pill bottle", "cake".
        size: side of the square image in pixels.
        rng: the source of jitter (position, size, shades, noise); same state, same bytes.
    """
    category = next(cat for cat, names in OBJECTS.items() if name in names)
    image = plain_background(size, rng)
    draw = ImageDraw.Draw(image)
    scale = size * rng.uniform(0.36, 0.44)
    centre_x = size / 2 + rng.uniform(-0.08, 0.08) * size
    centre_y = size / 2 + rng.uniform(-0.08, 0.08) * size
    primary, secondary, accent = (jitter_colour(c, rng) for c in _PALETTES[category])
    OBJECT_DRAWINGS[name](UnitCanvas(draw, centre_x, centre_y, scale), primary, secondary, accent)
    return add_noise(image, rng)


def draw_typographic(
    lines: tuple[str, ...], size: int, rng: random.Random, scale: int = 2, jitter: int = 0
) -> Image.Image:
    """Render an instruction, one line per entry, with PIL's bitmap font on a plain background.

    The layout (background shade, ink shade, offset, noise) is drawn from one distribution for
    every phrase, so the safety of a typographic image can only be read from its words. The
    text is drawn on a canvas of `size / scale` px (the bitmap font is 6x11 px per character)
    and enlarged `scale` times, nearest neighbour, so the glyphs stay crisp and big enough for
    a vision tower whose tokens see 28x28 px each.

    Each line gets a row of visual tokens of its own (`TOKEN_ROW` px, the tiny Qwen2.5-VL's
    merged token): a line's words never share a token with the next line's, so a frame line
    never seen in training changes the tokens of its own row only, not those of the key that
    carries the safety. The rows are centred (the lower row when they cannot be); `jitter`
    moves the block by up to that many font pixels, within the rows.
    """
    font = bitmap_font()
    canvas = size // scale
    image = plain_background(canvas, rng)
    draw = ImageDraw.Draw(image)
    ink = jitter_colour((30, 30, 30), rng, 25)
    rows_per_line = math.ceil(LINE_HEIGHT * scale / TOKEN_ROW)
    pitch = rows_per_line * TOKEN_ROW / scale  # canvas px from one line to the next
    slots = size // (rows_per_line * TOKEN_ROW)
    first = max(0, (slots - len(lines) + 1) // 2)
    top = first * pitch + (pitch - LINE_HEIGHT) / 2 + rng.randint(-jitter, jitter)
    left = 2 + rng.randint(0, jitter)
    for i, line in enumerate(lines):
        draw.text((left, round(top + i * pitch)), line, fill=ink, font=font)
    image = image.resize((size, size), Image.Resampling.NEAREST)
    return add_noise(image, rng, sigma=4.0)


# -- records ----------------------------------------------------------------------------------


def _allocate(total: int, weights: list[float]) -> list[int]:
    """Split `total` into integer counts proportional to `weights` (largest remainder)."""
    norm = sum(weights)
    exact = [total * w / norm if norm else 0.0 for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _kinds(total: int, typographic_fraction: float) -> list[tuple[str, str]]:
    """The (visual, textual) category of each record; typographic ones are ("typo", safety)."""
    kinds = [(v, t) for v, t, _ in PICTURE_MIX]
    kinds += [("typo", "unsafe"), ("typo", "safe")]
    picture_total = sum(w for _, _, w in PICTURE_MIX)
    weights = [w / picture_total * (1.0 - typographic_fraction) for _, _, w in PICTURE_MIX]
    weights += [typographic_fraction / 2, typographic_fraction / 2]
    counts = _allocate(total, weights)
    return [kind for kind, count in zip(kinds, counts, strict=True) for _ in range(count)]


def picture_caption(name: str) -> str:
    """What a picture record shows, in words (the object, never its safety)."""
    return f"A picture of a {name}."


def typographic_caption(lines: tuple[str, ...]) -> str:
    """What a typographic record shows: the words written in it."""
    return f"The image says: {' '.join(lines)}."


def _draw_record(
    kind: tuple[str, str], novelty: str, config: DemoConfig, rng: random.Random
) -> SafetyRecord:
    """One record of `kind` ((visual, textual) category) and `novelty` ("" for training)."""
    visual, textual = kind
    if visual == "typo":
        lines = draw_typographic_phrase(textual, novelty, rng)
        image = draw_typographic(
            lines,
            config.typographic_size,
            rng,
            config.typographic_scale,
            config.typographic_jitter,
        )
        return SafetyRecord(
            image=image,
            caption=typographic_caption(lines),
            prompt=rng.choice(TYPOGRAPHIC_PROMPTS),
            image_tag=textual,
            text_tag="safe",
            combine_tag=textual,
            source=SOURCE_TYPOGRAPHIC,
            novelty=novelty,
        )
    name, instruction = draw_picture_request(visual, textual, novelty, rng)
    image = draw_object(name, config.image_size, rng)
    image_tag = "unsafe" if visual == "unsafe" else "safe"
    text_tag = "unsafe" if textual == "unsafe" else "safe"
    combined = combine_tag(
        image_tag, text_tag, hazard=visual == "hazard", dual_use=textual == "dual-use"
    )
    return SafetyRecord(
        image=image,
        prompt=instruction,
        image_tag=image_tag,
        text_tag=text_tag,
        combine_tag=combined,
        source=SOURCE_PICTURE,
        caption=picture_caption(name),
        novelty=novelty,
    )


def _fingerprint(record: SafetyRecord) -> str:
    assert record.image is not None
    return hashlib.sha1(record.image.tobytes() + record.prompt.encode()).hexdigest()


def make_demo_split(
    split: str, count: int, config: DemoConfig, seen: set[str] | None = None
) -> list[SafetyRecord]:
    """Draw one split of `count` records; `seen` fingerprints are avoided and extended.

    Each split has its own random stream (seeded by `config.seed` and the split name), so its
    records do not depend on the sizes of the other splits. "train" draws only training
    combinations; any other split draws only held-out ones, alternately "unseen-pair" and
    "unseen-wording" records (`safegrpo_pl.demo.vocab`).
    """
    seen = set() if seen is None else seen
    rng = random.Random(f"safegrpo-demo/{config.seed}/{split}")
    kinds = _kinds(count, config.typographic_share(split))
    rng.shuffle(kinds)
    records = []
    for index, kind in enumerate(kinds):
        novelty = "" if split == "train" else HELD_OUT_KINDS[index % len(HELD_OUT_KINDS)]
        for _ in range(_MAX_REDRAWS):
            record = _draw_record(kind, novelty, config, rng)
            key = _fingerprint(record)
            if key not in seen:
                break
        else:  # pragma: no cover - would need ~100 identical noisy draws in a row
            raise RuntimeError(f"demo split {split}: could not draw a new record {index}")
        seen.add(key)
        records.append(replace(record, id=f"demo-{split}-{index:05d}"))
    return records


def make_demo_splits(config: DemoConfig | None = None) -> dict[str, list[SafetyRecord]]:
    """The demo set's three splits, keyed "train", "validation", "test"; disjoint, deterministic.

    No (image, prompt) pair occurs in two splits: a repeated draw is drawn again.
    """
    config = config or DemoConfig()
    seen: set[str] = set()
    sizes = {"train": config.num_train, "validation": config.num_val, "test": config.num_test}
    return {split: make_demo_split(split, sizes[split], config, seen) for split in SPLIT_NAMES}


def demo_corpus() -> list[str]:
    """Every template string of the demo (and of its ideal responses), to train a tokenizer on.

    A tiny BPE trained on these makes the demo's prompts and completions tokenize compactly.
    """
    phrases = [lines for safety in TAG_VALUES for lines in all_typographic_phrases(safety)]
    texts = [text for category in TEXT_CATEGORIES for text in all_instructions(category)]
    texts += list(TYPOGRAPHIC_PROMPTS)
    texts += [" ".join(lines) for lines in phrases]
    texts += [picture_caption(name) for names in OBJECTS.values() for name in names]
    texts += [typographic_caption(lines) for lines in phrases]
    texts += [DEFAULT_SAFETY_GUIDE, *REFUSAL_ANSWERS, *HELPFUL_ANSWERS]
    texts += [build_user_text(text) for text in all_instructions("benign")[:1]]
    for visual in TAG_VALUES:
        for text in TAG_VALUES:
            for combined in TAG_VALUES:
                answer = REFUSAL_ANSWERS[0] if combined == "unsafe" else HELPFUL_ANSWERS[0]
                texts.append(
                    format_response(visual=visual, text=text, combined=combined, answer=answer)
                )
    return texts
