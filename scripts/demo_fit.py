"""Does a trained demo model miss held-out records only, or its own training records too?

    python scripts/demo_fit.py MODEL_DIR [MODEL_DIR ...] [--config configs/tiny.yaml]
        [--limit 120]

MODEL_DIR is a fit's exported model (`runs/tiny/logs/version_0/checkpoints/model`). For each
split of the demo set (drawn as the fit's config, `data.demo`, draws it) and each source,
decodes greedily with the decoder validation uses, and prints how often the model's behaviour is
right (refuses exactly the unsafe pairs), split by the held-out kind of the record. A model that
gets its training images right and misses held-out ones has not generalised; one that misses
both has not fitted, and more or better signal, not other held-out data, is what it lacks.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.core.rewards import RewardParts, score_completions
from safegrpo_pl.demo.dataset import DemoConfig, make_demo_splits
from safegrpo_pl.policy.inputs import PromptEncoder
from safegrpo_pl.policy.model import DecodeIds, load_policy
from safegrpo_pl.rollout.sampling import SamplingSettings, sample_groups

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


class GreedyDecoder:
    """A trained model loaded once, decoding greedily with the decoder validation uses."""

    def __init__(self, model_dir: str, max_new_tokens: int = 64) -> None:
        self.encoder = PromptEncoder.from_pretrained(model_dir, guide=None)
        self.model = load_policy(model_dir).eval()
        self.decode_ids = DecodeIds.of(self.encoder.tokenizer, self.model)
        self.settings = SamplingSettings(do_sample=False, max_new_tokens=max_new_tokens)

    @torch.inference_mode()
    def parts(self, records: Sequence[SafetyRecord]) -> list[RewardParts]:
        """Decode `records` and score the completions."""
        batch = self.encoder.encode(list(records))
        rollout = sample_groups(
            self.model,
            batch,
            group_size=1,
            settings=self.settings,
            tokenizer=self.encoder.tokenizer,
            **self.decode_ids.sampling_kwargs(),
        )
        return score_completions(
            rollout.texts, batch.image_tags, batch.text_tags, batch.combine_tags
        )


def demo_config(config_path: Path) -> DemoConfig:
    """The demo set's sizes and drawing settings of a fit's config (`data.demo`)."""
    config = yaml.safe_load(config_path.read_text())
    return DemoConfig(**config.get("data", {}).get("demo", {}))


def demo_fit(model_dir: str, demo: DemoConfig, limit: int) -> Tally:
    """`tally` of every split and source, at most `limit` records of each."""
    decoder = GreedyDecoder(model_dir)
    result: Tally = {}
    for split, records in make_demo_splits(demo).items():
        for source in sorted({r.source for r in records}):
            chosen = [r for r in records if r.source == source][:limit]
            result.update(tally(split, chosen, decoder.parts(chosen)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    parser.add_argument("--limit", type=int, default=120, help="records per split and source")
    args = parser.parse_args()
    torch.set_num_threads(2)
    demo = demo_config(args.config)
    for path in args.model_dirs:
        print(path)
        for (split, source, kind), (right, total) in demo_fit(path, demo, args.limit).items():
            print(
                f"  {split:10s} {source:17s} {kind:14s} {right:3d}/{total:<3d} {right / total:.0%}"
            )


if __name__ == "__main__":
    main()
