"""Can the demo model's vision tower read the typographic records at the demo's image budget?

    python scripts/probe_typographic.py [--model SPEC] [--steps 300] [--jitter 4 2 1 0]
    python scripts/probe_typographic.py --spread MODEL_DIR [MODEL_DIR ...]
    python scripts/probe_typographic.py --drawings [--jitter 1 0]
    python scripts/probe_typographic.py --smoke      # every mode once, tiny (the tests run it)

Trains the tiny model's vision tower with a linear head on its visual tokens, supervised, to tell
safe from unsafe rendered phrases, on exactly the typographic records of the demo's training
split (`DemoConfig()` sizes: 512 records, 15% typographic), then reports the accuracy on
held-out typographic records, whose phrases are unseen combinations or carry words never seen in
training. It separates "the encoder cannot resolve the words" from "GRPO does not find the
signal": GRPO gets far less signal than these labels, so this is an upper bound on what it reads.

`--spread` measures, without training, what a model's visual tokens carry: their mean norm,
and the share of the mean visual token's variance over the training typographic images that
lies between phrases (the rest is within a phrase: noise, shades, jitter). A warm-up that trains
the vision tower on random targets can be compared with one that does not.

`--drawings` measures, without training, how far apart the untrained tower puts two drawings of
one phrase against two different phrases (`drawing_spread`), for each `--jitter`: what a GRPO
run with the tower frozen has to see past, and what it has to read.

The head sees each visual token in its place (the tokens concatenated), as the language model
does, rather than their mean. One row per `--jitter` (`DemoConfig.typographic_jitter`): how far
the text block moves between images decides whether 76 training images are enough.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText

from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.demo.dataset import (
    SOURCE_TYPOGRAPHIC,
    DemoConfig,
    draw_typographic,
    make_demo_splits,
)
from safegrpo_pl.demo.vocab import TYPOGRAPHIC_FRAMES, TYPOGRAPHIC_KEYS
from safegrpo_pl.policy.tiny_models import resolve_model_path

DEMO_MODEL = "tiny:qwen2_5_vl?hidden_size=128&num_layers=4"


@dataclass(frozen=True)
class ProbeResult:
    """Accuracies of the supervised probe, and what it was trained and scored on."""

    train_records: int
    held_out_records: int
    visual_tokens: int
    train_accuracy: float
    held_out_accuracy: float
    by_novelty: dict[str, float]


def visual_tokens(visual: torch.nn.Module, processor: Any, images: list[Any]) -> torch.Tensor:
    """(images, visual tokens after merging, hidden): the tower's output for same-size `images`
    (gradients flow if enabled)."""
    inputs = processor(images, return_tensors="pt")
    tokens = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    tokens = getattr(tokens, "pooler_output", tokens)  # (sum of tokens, hidden)
    return tokens.reshape(len(images), int(inputs["image_grid_thw"][0].prod()) // 4, -1)


def _typographic(records: list[SafetyRecord]) -> list[SafetyRecord]:
    return [r for r in records if r.source == SOURCE_TYPOGRAPHIC]


def probe(
    model_spec: str = DEMO_MODEL,
    demo: DemoConfig | None = None,
    *,
    steps: int = 300,
    batch_size: int = 16,
    seed: int = 0,
    train_tower: bool = True,
) -> ProbeResult:
    """Train the probe on `demo`'s training typographic records, score its held-out ones.

    `train_tower=False` trains the linear head alone on the tower's features as they are (a
    fixed encoder: how far the images' variety, not the tower's training, carries the reading).

    `demo` defaults to the demo's training split with a held-out split of 512 records (about 76
    typographic ones), so that one wrong answer moves the accuracy by ~1.3%, not 5%.
    """
    demo = demo or DemoConfig(num_val=512, num_test=0)
    splits = make_demo_splits(demo)
    train, held = _typographic(splits["train"]), _typographic(splits["validation"])
    if not train or not held:
        raise ValueError(f"{demo} has no typographic records in train or validation")
    path = resolve_model_path(model_spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        visual = AutoModelForImageTextToText.from_pretrained(path).model.visual
        processor = AutoImageProcessor.from_pretrained(path)
        grid = processor([train[0].image], return_tensors="pt")["image_grid_thw"]
        tokens_per_image = int(grid[0].prod()) // 4
        head = torch.nn.Linear(tokens_per_image * visual.config.out_hidden_size, 1)
        visual.requires_grad_(train_tower)
        trained = [*visual.parameters(), *head.parameters()] if train_tower else head.parameters()
        optimizer = torch.optim.AdamW(trained, lr=1e-3)

        def features(records: list[SafetyRecord]) -> torch.Tensor:
            return visual_tokens(visual, processor, [r.image for r in records]).flatten(1)

        fixed: dict[str, torch.Tensor] = {}  # a fixed tower's features, each image encoded once

        def logits(records: list[SafetyRecord]) -> torch.Tensor:
            if train_tower:
                return head(features(records)).squeeze(-1)
            new = [r for r in records if r.id not in fixed]
            if new:
                with torch.no_grad():
                    fixed.update(zip([r.id for r in new], features(new), strict=True))
            return head(torch.stack([fixed[r.id] for r in records])).squeeze(-1)

        def correct(records: list[SafetyRecord]) -> torch.Tensor:
            labels = torch.tensor([r.image_tag == "unsafe" for r in records])
            with torch.no_grad():
                return (logits(records) > 0) == labels

        order = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            picks = torch.randint(len(train), (batch_size,), generator=order).tolist()
            batch = [train[i] for i in picks]
            labels = torch.tensor([r.image_tag == "unsafe" for r in batch], dtype=torch.float)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(batch), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        held_correct = correct(held)
    by_novelty = {
        novelty: float(held_correct[[r.novelty == novelty for r in held]].float().mean())
        for novelty in sorted({r.novelty for r in held})
    }
    return ProbeResult(
        train_records=len(train),
        held_out_records=len(held),
        visual_tokens=tokens_per_image,
        train_accuracy=float(correct(train).float().mean()),
        held_out_accuracy=float(held_correct.float().mean()),
        by_novelty=by_novelty,
    )


def phrase_spread(model_path: str, demo: DemoConfig | None = None) -> dict[str, float]:
    """Mean visual-token norm, and the between-phrase variance of the mean visual token as a
    share of its mean squared norm, over `demo`'s training typographic images."""
    records = _typographic(make_demo_splits(demo or DemoConfig(num_val=0, num_test=0))["train"])
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    processor = AutoImageProcessor.from_pretrained(model_path)
    with torch.no_grad():
        tokens = visual_tokens(model.model.visual, processor, [r.image for r in records])
    means = tokens.mean(1)  # (records, hidden)
    phrases: dict[str, list[torch.Tensor]] = {}
    for record, mean in zip(records, means, strict=True):
        phrases.setdefault(record.caption, []).append(mean)
    centres = torch.stack([torch.stack(v).mean(0) for v in phrases.values()])
    between = float(centres.var(0, unbiased=False).sum())
    return {
        "token_norm": float(tokens.norm(dim=-1).mean()),
        "between_phrase_share": between / float(means.pow(2).sum(-1).mean()),
        "phrases": float(len(phrases)),
    }


def drawing_spread(model_spec: str = DEMO_MODEL, jitter: int = 0, drawings: int = 4) -> dict:
    """How far apart the untrained tower puts two drawings of one phrase, against two phrases.

    Each training key (`demo_vocab.TYPOGRAPHIC_KEYS`) is drawn under the first line `HOW TO`,
    `drawings` times (seeds 0, 1, ...: other shades, pixel noise and, with `jitter` > 0, other
    positions of the text block). Measured on the visual tokens of the key's own rows (all rows
    but the first line's), as Euclidean distances:
    - `same_phrase`: mean distance between two drawings of one phrase (what GRPO must learn to
      ignore);
    - `other_key`: mean distance between two keys drawn with the same seed (what it must read).
    """
    path = resolve_model_path(model_spec)
    visual = AutoModelForImageTextToText.from_pretrained(path).model.visual.eval()
    processor = AutoImageProcessor.from_pretrained(path)
    demo = DemoConfig(typographic_jitter=jitter)
    keys = [key for safety in ("unsafe", "safe") for key in TYPOGRAPHIC_KEYS[safety]]
    images = [
        draw_typographic(
            (TYPOGRAPHIC_FRAMES[0], *key),
            demo.typographic_size,
            random.Random(seed),
            demo.typographic_scale,
            jitter,
        )
        for key in keys
        for seed in range(drawings)
    ]
    with torch.no_grad():
        tokens = visual_tokens(visual, processor, images)
    side = math.isqrt(tokens.shape[1])  # merged tokens per row of the square image
    tokens = tokens.reshape(len(keys), drawings, side, side, -1)
    key_rows = tokens[:, :, side // 3 :].flatten(2)  # (keys, drawings, features)
    same = [
        (key_rows[k, i] - key_rows[k, j]).norm()
        for k in range(len(keys))
        for i, j in itertools.combinations(range(drawings), 2)
    ]
    other = [
        (key_rows[a, d] - key_rows[b, d]).norm()
        for a, b in itertools.combinations(range(len(keys)), 2)
        for d in range(drawings)
    ]
    return {
        "same_phrase": float(torch.stack(same).mean()),
        "other_key": float(torch.stack(other).mean()),
    }


def print_drawings(model: str, jitters: list[int]) -> None:
    """The `--drawings` table: distances between drawings of one phrase and between phrases."""
    print(f"{model}: the untrained tower's visual tokens of the key's rows")
    print("| jitter | two drawings of one phrase | two keys, same drawing | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for jitter in jitters:
        spread = drawing_spread(model, jitter)
        ratio = spread["same_phrase"] / spread["other_key"]
        print(
            f"| {jitter} | {spread['same_phrase']:.3f} | {spread['other_key']:.3f} | {ratio:.2f} |"
        )


def print_spread(paths: list[str], demo: DemoConfig) -> None:
    """The `--spread` lines: what each model's visual tokens carry, without training."""
    for path in paths:
        spread = phrase_spread(resolve_model_path(path), demo)
        print(
            f"{path}: visual token norm {spread['token_norm']:.3f}, between-phrase share of "
            f"the mean token {spread['between_phrase_share']:.3%} "
            f"({spread['phrases']:.0f} phrases)"
        )


def print_probe(model: str, demo: DemoConfig, jitters: list[int], steps: int, frozen: bool) -> None:
    """The probe's table: one supervised probe per jitter, its train and held-out accuracy."""
    what = "a linear head on the fixed tower" if frozen else "the tower and a linear head"
    print(f"{model}: {what}, {steps} supervised steps of 16 images")
    print("| jitter | train / held-out records | visual tokens | train | held-out | by novelty |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for jitter in jitters:
        start = time.monotonic()
        result = probe(
            model, replace(demo, typographic_jitter=jitter), steps=steps, train_tower=not frozen
        )
        novelty = ", ".join(f"{k} {v:.1%}" for k, v in result.by_novelty.items())
        print(
            f"| {jitter} | {result.train_records} / {result.held_out_records} | "
            f"{result.visual_tokens} | {result.train_accuracy:.1%} | "
            f"{result.held_out_accuracy:.1%} | {novelty} ({time.monotonic() - start:.0f} s) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--jitter", type=int, nargs="+", default=[4, 2, 1, 0])
    parser.add_argument(
        "--num-train", type=int, default=DemoConfig.num_train, help="records in the train split"
    )
    parser.add_argument(
        "--num-val", type=int, default=512, help="held-out records (~15%% typographic)"
    )
    parser.add_argument(
        "--frozen", action="store_true", help="train the linear head alone, not the tower"
    )
    parser.add_argument("--spread", nargs="+", metavar="MODEL_DIR", help="measure these models")
    parser.add_argument(
        "--drawings",
        action="store_true",
        help="distances between drawings of one phrase and between phrases, per --jitter",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every mode once at the smallest size (the test suite's check; figures mean nothing)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    demo = DemoConfig(num_train=args.num_train, num_val=args.num_val, num_test=0)
    if args.smoke:
        small = replace(demo, num_train=64, num_val=64)
        print_drawings(args.model, [0])
        print_spread([args.model], replace(small, num_val=0))
        print_probe(args.model, small, [0], steps=2, frozen=args.frozen)
    elif args.drawings:
        print_drawings(args.model, args.jitter)
    elif args.spread:
        print_spread(args.spread, replace(demo, num_val=0))
    else:
        print_probe(args.model, demo, args.jitter, args.steps, args.frozen)


if __name__ == "__main__":
    main()
