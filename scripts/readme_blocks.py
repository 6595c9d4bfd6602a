"""Write the README's output blocks from what the commands wrote, or check that they match.

    python scripts/readme_blocks.py            # rewrite the blocks in README.md
    python scripts/readme_blocks.py --check    # exit 1 naming every block that differs

A block is the text between `<!-- generated: NAME -->` and `<!-- end: NAME -->`. Its source:
- `demo`: the tables of docs/demo/summary.md, the summary.md of the `make demo` run quoted;
- `eval-demo`: the first table of docs/eval-demo/report.md (`evaluate --config
  configs/eval-demo.yaml` on that run's models);
- `eval-tiny`: the head of the report.md that `evaluate --config configs/eval-tiny.yaml`
  writes now (run into a temporary folder: random tiny models, greedy, so always the same);
- `bench`: docs/bench/bench.md, the bench.md of the `make bench` run quoted.
The `plan` outputs and the mistyped-option line are `$ python -m safegrpo_pl ...` blocks, which
tests/test_readme.py runs again; the plan figures in config comments are scripts/plan_comments.py's.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(
    r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S
)
EVAL_TINY_ROWS = 6  # rows of the per-benchmark table shown


def tables(markdown: str) -> list[str]:
    """The markdown tables in `markdown`, in order, each as its lines joined."""
    found, current = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append("\n".join(current))
            current = []
    return found


def demo_block() -> str:
    return "\n\n".join(tables((ROOT / "docs/demo/summary.md").read_text())[:3])


def eval_demo_block() -> str:
    return tables((ROOT / "docs/eval-demo/report.md").read_text())[0]


def eval_tiny_block() -> str:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "safegrpo_pl", "evaluate", "--config"]
        command += ["configs/eval-tiny.yaml", "--output_dir", out]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
        report = (Path(out) / "report.md").read_text()
    judged = next(line for line in report.splitlines() if line.startswith("Safety figures"))
    overview, per_benchmark = tables(report)[:2]
    head = per_benchmark.splitlines()[: 2 + EVAL_TINY_ROWS]
    return "\n\n".join([judged, overview, "\n".join(head)])


def bench_block() -> str:
    return (ROOT / "docs/bench/bench.md").read_text().strip()


SOURCES: dict[str, Callable[[], str]] = {
    "demo": demo_block,
    "eval-demo": eval_demo_block,
    "eval-tiny": eval_tiny_block,
    "bench": bench_block,
}


def regenerate(readme: str) -> tuple[str, list[str]]:
    """(the README with every block written anew, the names of the blocks that changed)."""
    names = [m.group("name") for m in BLOCK.finditer(readme)]
    unknown = sorted(set(names) - set(SOURCES))
    missing = sorted(set(SOURCES) - set(names))
    if unknown or missing:
        raise SystemExit(
            f"README blocks: unknown {unknown}, missing {missing}; known: {list(SOURCES)}"
        )
    changed: list[str] = []

    def fill(match: re.Match[str]) -> str:
        body = SOURCES[match.group("name")]().strip() + "\n"
        if body != match.group("body"):
            changed.append(match.group("name"))
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(fill, readme), changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 on a difference"
    )
    args = parser.parse_args()
    old = README.read_text()
    new, changed = regenerate(old)
    if args.check:
        if changed:
            diff = difflib.unified_diff(
                old.splitlines(), new.splitlines(), "README.md", "regenerated", lineterm=""
            )
            print("\n".join(diff))
            sys.exit(
                f"README blocks out of date: {', '.join(changed)} (run scripts/readme_blocks.py)"
            )
        print(f"README blocks up to date: {', '.join(SOURCES)}")
        return
    README.write_text(new)
    print(f"README blocks rewritten: {', '.join(changed) or 'none changed'}")


if __name__ == "__main__":
    main()
