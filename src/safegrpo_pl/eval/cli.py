"""`python -m safegrpo_pl evaluate --config FILE`: the evaluation's command line.

LightningCLI has fixed subcommands (fit, validate, ...), so `safegrpo_pl.cli.main` hands
`evaluate` to this parser: jsonargparse over `safegrpo_pl.eval.run.evaluate`'s typed
arguments, so every config key is documented in `--help` and can be overridden on the command
line (`--judge.kind keyword --data.limit 20`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from safegrpo_pl.core.errors import OneLineParserErrors
from safegrpo_pl.eval.run import evaluate


class _Parser(OneLineParserErrors, ArgumentParser):
    """jsonargparse's parser, with one-line errors and no abbreviated options."""


def build_parser() -> ArgumentParser:
    """The parser of `evaluate`'s arguments (a YAML config, then overrides)."""
    parser = _Parser(
        prog="python -m safegrpo_pl evaluate",
        description="Evaluate base and tuned models on the safety benchmarks; write a report.",
        parser_mode="omegaconf",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config file")
    parser.add_function_arguments(evaluate, fail_untyped=True)
    return parser


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse `args` (default: sys.argv) and run the evaluation; returns the report."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    config = parser.parse_args(list(args) if args is not None else None)
    config = parser.instantiate_classes(config)
    kwargs = {k: v for k, v in vars(config).items() if k != "config"}
    return evaluate(**kwargs)
