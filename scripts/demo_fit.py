"""Does a trained demo model miss held-out records only, or its own training records too?

    python scripts/demo_fit.py MODEL_DIR [MODEL_DIR ...] [--num-train 2048] [--limit 120]
        [--num-held-out 128]

MODEL_DIR is a fit's exported model (`runs/tiny/logs/version_0/checkpoints/model`). For each
split of the demo set (drawn with the sizes of configs/tiny.yaml, as the fit's was) and each
source, decodes greedily, as validation does, and prints how often the model's behaviour is
right (refuses exactly the unsafe pairs), split by the held-out kind of the record. A model that
gets its training images right and misses held-out ones has not generalised; one that misses
both has not fitted, and more or better signal, not other held-out data, is what it lacks.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence

import torch
from transformers import AutoModelForImageTextToText

from safegrpo_pl.demo_data import DemoConfig, make_demo_splits
from safegrpo_pl.inputs import PromptEncoder
from safegrpo_pl.records import SafetyRecord
from safegrpo_pl.rewards import RewardParts, score_completions

Tally = dict[tuple[str, str, str], tuple[int, int]]
"""(split, source, novelty or "train") -> (records whose behaviour is right, records)."""


def tally(split: str, records: Sequence[SafetyRecord], parts: Sequence[RewardParts]) -> Tally:
    """Count right behaviours (a refusal exactly when the pair is unsafe) per source and kind."""
    right: Counter[tuple[str, str, str]] = Counter()
    total: Counter[tuple[str, str, str]] = Counter()
    for record, part in zip(records, parts, strict=True):
        key = (split, record.source, record.novelty or "train")
        total[key] += 1
        right[key] += part.refused == (record.combine_tag == "unsafe")
    return {key: (right[key], total[key]) for key in sorted(total)}


@torch.no_grad()
def greedy_parts(model_dir: str, records: Sequence[SafetyRecord]) -> list[RewardParts]:
    """Decode `records` greedily with the model in `model_dir` and score the completions."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    encoder = PromptEncoder.from_pretrained(model_dir, guide=None)
    batch = encoder.encode(list(records))
    out = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        **batch.model_kwargs,
        max_new_tokens=64,
        do_sample=False,
    )
    texts = encoder.tokenizer.batch_decode(
        out[:, batch.input_ids.shape[1] :], skip_special_tokens=True
    )
    return score_completions(texts, batch.image_tags, batch.text_tags, batch.combine_tags)


def demo_fit(model_dir: str, demo: DemoConfig, limit: int) -> Tally:
    """`tally` of every split and source, at most `limit` records of each."""
    result: Tally = {}
    for split, records in make_demo_splits(demo).items():
        for source in sorted({r.source for r in records}):
            chosen = [r for r in records if r.source == source][:limit]
            result.update(tally(split, chosen, greedy_parts(model_dir, chosen)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
    parser.add_argument("--num-train", type=int, default=2048, help="as configs/tiny.yaml")
    parser.add_argument("--num-held-out", type=int, default=128, help="validation and test")
    parser.add_argument("--limit", type=int, default=120, help="records per split and source")
    args = parser.parse_args()
    torch.set_num_threads(2)
    held_out = args.num_held_out
    demo = DemoConfig(num_train=args.num_train, num_val=held_out, num_test=held_out)
    for path in args.model_dirs:
        print(path)
        for (split, source, kind), (right, total) in demo_fit(path, demo, args.limit).items():
            print(
                f"  {split:10s} {source:17s} {kind:14s} {right:3d}/{total:<3d} {right / total:.0%}"
            )


if __name__ == "__main__":
    main()
