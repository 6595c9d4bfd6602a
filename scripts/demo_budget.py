"""How many visual tokens the demo's records get from the demo model's image processor.

    python scripts/demo_budget.py [--config configs/tiny.yaml]

Prints, per record source, the image size, the visual tokens after merging, the pixels each
token covers and the prompt length in tokens, measured with the image processor and tokenizer
of the model named in the config (`model.policy.name_or_path`), on the demo's validation split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from safegrpo_pl.demo.dataset import DemoConfig, make_demo_splits
from safegrpo_pl.policy.inputs import PromptEncoder


def measure(config_path: Path) -> list[dict[str, object]]:
    """One row per record source: size, visual tokens, px per token side, prompt tokens."""
    config = yaml.safe_load(config_path.read_text())
    encoder = PromptEncoder.from_pretrained(
        config["model"]["policy"]["name_or_path"], guide=config.get("data", {}).get("guide")
    )
    demo = DemoConfig(**{**config.get("data", {}).get("demo", {}), "num_train": 0})
    rows, done = [], set()
    for record in make_demo_splits(demo)["validation"]:
        if record.source in done:
            continue
        done.add(record.source)
        tokens = encoder.image_tokens(record.image)
        rows.append(
            {
                "source": record.source,
                "image_px": record.image.size[0],
                "visual_tokens": tokens,
                "px_per_token_side": record.image.size[0] / tokens**0.5,
                "prompt_tokens": encoder.prompt_length(record),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    args = parser.parse_args()
    print("| source | image (px) | visual tokens | px per token (side) | prompt tokens |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in measure(args.config):
        print(
            f"| {row['source']} | {row['image_px']} | {row['visual_tokens']} | "
            f"{row['px_per_token_side']:.0f} | {row['prompt_tokens']} |"
        )


if __name__ == "__main__":
    main()
