"""Can the demo model's vision tower read the typographic records at the demo's image budget?

    python scripts/probe_typographic.py [--model SPEC] [--steps 200]

Trains the tiny model's vision tower with a linear head on the pooled visual tokens, supervised,
to tell safe from unsafe rendered phrases (training split), then reports the accuracy on the
held-out split, whose phrases are unseen combinations or carry words never seen in training.
It separates "the encoder cannot resolve the words" from "GRPO does not find the signal": GRPO
gets far less signal than these labels, so this is an upper bound on what it can read.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText

from safegrpo_pl.demo_data import DemoConfig, make_demo_splits
from safegrpo_pl.tiny_models import resolve_model_path

DEMO_MODEL = "tiny:qwen2_5_vl?hidden_size=128&num_layers=4"


def probe(model_spec: str, steps: int, batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    """Train the probe; returns accuracies on 200 train and 200 held-out phrases."""
    torch.manual_seed(seed)
    path = resolve_model_path(model_spec)
    visual = AutoModelForImageTextToText.from_pretrained(path).model.visual
    processor = AutoImageProcessor.from_pretrained(path)
    config = DemoConfig(num_train=600, num_val=200, num_test=0, typographic_fraction=1.0)
    splits = make_demo_splits(config)
    head = torch.nn.Linear(visual.config.out_hidden_size, 1)
    optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=1e-3)

    def logits(records):
        inputs = processor([r.image for r in records], return_tensors="pt")
        grid = inputs["image_grid_thw"]
        tokens = visual(inputs["pixel_values"], grid_thw=grid)
        tokens = getattr(tokens, "pooler_output", tokens)  # (sum of tokens, hidden)
        per_image = int(grid[0].prod()) // 4
        return head(tokens.view(len(records), per_image, -1).mean(1)).squeeze(-1)

    def labels(records):
        return torch.tensor([r.image_tag == "unsafe" for r in records], dtype=torch.float)

    train = splits["train"]
    for step in range(steps):
        batch = [train[(step * batch_size + i) % len(train)] for i in range(batch_size)]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(batch), labels(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return {
            name: float(((logits(records) > 0).float() == labels(records)).float().mean())
            for name, records in (("train", train[:200]), ("held-out", splits["validation"]))
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.monotonic()
    accuracy = probe(args.model, args.steps)
    print(
        f"{args.model}: safety read on train {accuracy['train']:.1%}, held-out "
        f"{accuracy['held-out']:.1%} ({args.steps} steps, {time.monotonic() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
