"""Write `plan`'s table into a config's memory comments, or check that it is there unchanged.

    PYTHONPATH=src python scripts/plan_comments.py           # rewrite the blocks
    PYTHONPATH=src python scripts/plan_comments.py --check   # exit 1 where a block differs

A config's memory figures are `plan`'s, never worked out by hand: each config in `BLOCKS` holds
one block of comments between `BEGIN` and `END`, the output of `plan --all_phases` on the
arguments listed for it (tests/test_plan.py checks that every block matches).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safegrpo_pl.plan.cli import config_dims, parse_memory, plan_report, read_config, run_shape
from safegrpo_pl.plan.cli import verdict as plan_verdict
from safegrpo_pl.plan.memory import estimate

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "# >>> plan"
END = "# <<< plan"
# config file -> (the `plan` arguments whose table it holds, the model's config.json)
BLOCKS = {
    "configs/qwen-full.yaml": (
        ["--config", "configs/qwen.yaml", "--config", "configs/qwen-full.yaml"],
        "tests/assets/qwen3-vl-8b-config.json",
    ),
}


def block(args: list[str], model_config: str) -> str:
    """The comment block: the command, then `plan`'s table on 80 GiB with 10% margin."""
    config = read_config([str(ROOT / a) if a.startswith("configs/") else a for a in args])
    dims = config_dims(config, str(ROOT / model_config))
    run = run_shape(config)
    result = plan_verdict(dims, run, parse_memory("80GB"), 0.1)
    table = plan_report(estimate(dims, run), run, result, all_phases=True)
    lines = [f"{BEGIN} (written by scripts/plan_comments.py, to the closing line):"]
    lines += [f"#   python -m safegrpo_pl plan {' '.join(args)} \\"]
    lines += [f"#     --model_config {model_config} --all_phases", "#"]
    lines += [f"# {line}".rstrip() for line in table.splitlines()]
    return "\n".join([*lines, END])


def replaced(text: str, new_block: str, path: str) -> str:
    """`text` with its block between `BEGIN` and `END` replaced by `new_block`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no block between {BEGIN!r} and {END!r}; add the two lines")
    return text[:start] + new_block + text[end + len(END) :]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 where a block differs")
    check = parser.parse_args().check
    stale = []
    for name, (args, model_config) in BLOCKS.items():
        path = ROOT / name
        text = path.read_text()
        new = replaced(text, block(args, model_config), name)
        if new != text:
            stale.append(name)
            if not check:
                path.write_text(new)
    verb = "differs from plan" if check else "rewritten"
    for name in stale:
        print(f"{name}: {verb}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
