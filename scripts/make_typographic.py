"""Turn text-only prompts into a typographic image-text dataset (as the paper did with BeaverTails).

Each input prompt is rendered into an image (PIL's bitmap font, word-wrapped, by
`safegrpo_pl.demo.drawings.render_text_image`); the record's
prompt becomes a neutral instruction to follow the text in the image. Tags follow the demo's
rule (`safegrpo_pl.demo.dataset`): `image_tag` = the input's tag (the rendered instruction's
safety), `text_tag` = safe (the neutral prompt), `combine_tag` = `image_tag`.

Input: a .jsonl file, one object per line with `prompt`, `text_tag` (or `tag`) = safe/unsafe
(any case), and optional `id`, `source`. Output: OUT_DIR/images/NNNNN.png and OUT_DIR/data.jsonl
whose `image` column holds paths relative to it; load it with
`SafeTagDataModule(dataset="OUT_DIR/data.jsonl")`.

    python scripts/make_typographic.py prompts.jsonl out_dir --width 448
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safegrpo_pl.core.records import TAG_VALUES
from safegrpo_pl.demo.dataset import TYPOGRAPHIC_PROMPTS
from safegrpo_pl.demo.drawings import render_text_image

log = logging.getLogger("make_typographic")


def read_prompts(path: Path) -> list[dict[str, str]]:
    """Read and check the input rows; errors name the line, the id, the field and the fix."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, found {type(row).__name__}")
        where = f"{path}:{number} (id={row.get('id') or '?'})"
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: prompt is {prompt!r}; expected a non-empty instruction")
        raw_tag = row.get("text_tag", row.get("tag"))
        tag = raw_tag.strip().lower() if isinstance(raw_tag, str) else raw_tag
        if tag not in TAG_VALUES:
            raise ValueError(
                f"{where}: text_tag (or tag) is {raw_tag!r}; expected 'safe' or 'unsafe'"
            )
        rows.append(
            {
                "prompt": prompt,
                "tag": tag,
                "id": str(row.get("id") or ""),
                "source": str(row.get("source") or ""),
            }
        )
    return rows


def make_typographic(
    rows: Sequence[dict[str, str]],
    out_dir: Path,
    *,
    instruction: str = TYPOGRAPHIC_PROMPTS[0],
    width: int = 448,
    scale: int = 2,
    source: str = "typographic",
) -> Path:
    """Render `rows` (from `read_prompts`) into OUT_DIR; return the path of data.jsonl."""
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    data = out_dir / "data.jsonl"
    with data.open("w", encoding="utf-8") as out:
        for index, row in enumerate(rows):
            name = f"images/{index:05d}.png"
            render_text_image(row["prompt"], width=width, scale=scale).save(out_dir / name)
            record = {
                "id": row["id"] or f"typo-{index:05d}",
                "source": row["source"] or source,
                "prompt": instruction,
                "image": name,
                "image_tag": row["tag"],
                "text_tag": "safe",
                "combine_tag": row["tag"],
                "instruction": row["prompt"],
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    log.info("wrote %d typographic records to %s", len(rows), data)
    return data


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the description keeps its paragraphs."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="\n\n".join(__doc__.split("\n\n")[:3]), formatter_class=_HelpFormatter
    )
    parser.add_argument("input", type=Path, help="jsonl with prompt, text_tag (or tag), id, source")
    parser.add_argument("out_dir", type=Path, help="folder to write images/ and data.jsonl into")
    parser.add_argument(
        "--instruction",
        default=TYPOGRAPHIC_PROMPTS[0],
        help="the neutral prompt that replaces each instruction",
    )
    parser.add_argument("--width", type=int, default=448, help="image width in pixels")
    parser.add_argument("--scale", type=int, default=2, help="enlargement of the bitmap font")
    parser.add_argument("--source", default="typographic", help="source of rows that have none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rows = read_prompts(args.input)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    make_typographic(
        rows,
        args.out_dir,
        instruction=args.instruction,
        width=args.width,
        scale=args.scale,
        source=args.source,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
