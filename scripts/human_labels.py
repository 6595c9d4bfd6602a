"""Build the human-labelled answer sets that the refusal judges are measured on.

    python scripts/human_labels.py [--from FILE] [--out DIR] [--gzip]
    python scripts/human_labels.py --out tests/assets/human_labels --gzip   # the shipped copy

Downloads each set's release file at its pinned commit (or reads it from `--from`, a local copy
of that file), checks its sha256, maps the authors' labels to refusal / compliance, splits it
by prompt hash into dev and held-out, and writes `<DIR>/<set>.jsonl` (default: `$SAFEGRPO_HUMAN_LABELS`
or `~/.cache/safegrpo-pl/human_labels`), or `<DIR>/<set>.jsonl.gz` with `--gzip` (the same bytes
on every run). The sets, their licences and label mappings are listed in
`safegrpo_pl.eval.human_labels.SOURCES` and docs/judges.md. The repository ships the converted
sets in `SHIPPED` (tests/assets/human_labels, with the release's licence), which the training and
agreement scripts and the tests read unless `$SAFEGRPO_HUMAN_LABELS` names another folder.
"""

from __future__ import annotations

import argparse
import os
import urllib.request
from collections import Counter
from pathlib import Path

from safegrpo_pl.eval.human_labels import LABELS_ENV, SOURCES, convert, labels_dir, write_set

SHIPPED = Path(__file__).resolve().parents[1] / "tests" / "assets" / "human_labels"


def default_labels() -> Path:
    """The folder the scripts read sets from: `$SAFEGRPO_HUMAN_LABELS` when set, else `SHIPPED`."""
    return labels_dir() if os.environ.get(LABELS_ENV) else SHIPPED


def build(out: Path, local: Path | None = None, gzipped: bool = False) -> dict[str, Counter]:
    """Convert every set into `out` (`.jsonl.gz` files when `gzipped`); `local` is a downloaded
    release file (one set only)."""
    counts = {}
    for name, source in SOURCES.items():
        if local is not None:
            raw = local.read_bytes()
        else:
            with urllib.request.urlopen(source.url, timeout=60) as response:
                raw = response.read()
        rows = convert(source, raw)
        write_set(rows, out / f"{name}.jsonl{'.gz' if gzipped else ''}")
        counts[name] = Counter((r.split, r.label) for r in rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="local", type=Path, help="a local copy of the release file")
    parser.add_argument("--out", type=Path, default=None, help="where to write the sets")
    parser.add_argument("--gzip", action="store_true", help="write <set>.jsonl.gz")
    args = parser.parse_args()
    out = args.out or labels_dir()
    for name, counts in build(out, args.local, args.gzip).items():
        summary = ", ".join(f"{split} {label} {n}" for (split, label), n in sorted(counts.items()))
        print(f"{out / name}.jsonl{'.gz' if args.gzip else ''}: {summary}")


if __name__ == "__main__":
    main()
