"""`safegrpo-pl fit|validate|test|predict|plan|evaluate --config FILE` (or
`python -m safegrpo_pl ...`): the entry point. The Trainer commands go to LightningCLI
(`run.trainer_cli.SafeGRPOCLI`), `plan` and `evaluate` to their own parsers; the project's own
errors print as one message and exit with status 1 (`--debug` or `SAFEGRPO_DEBUG=1` shows the
traceback).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from safegrpo_pl.core.errors import (
    DEBUG_ENV,
    DEBUG_FLAG,
    closest,
    debug_requested,
    error_message,
    is_expected_error,
)

__all__ = ["commands_help", "main"]


PROG = "python -m safegrpo_pl"
# Subcommands that are not Trainer commands: each reads the same kind of YAML, with its own parser.
EXTRA_COMMANDS = {
    "plan": "safegrpo_pl.plan.cli",  # a per-GPU memory estimate of a `fit` config
    "evaluate": "safegrpo_pl.eval.cli",  # benchmarks, judges, base vs tuned report
    "judge": "safegrpo_pl.eval.judge_cli",  # any JSONL of answers through evaluate's judges
}
# One line per subcommand for the top-level --help (an extra command missing here shows the
# first line of its module's docstring).
SUMMARIES = {
    "fit": "train: the format warm-up, then GRPO; checkpoints, exported model, report",
    "validate": "score a model on the validation split (safety score, refusal rate, tags)",
    "test": "score a model on the test split",
    "predict": "write each test record's completion and reward parts to predictions.jsonl",
    "plan": "estimate the per-GPU memory of a fit config, without loading the model",
    "evaluate": "benchmarks and judges, base against tuned model; report.md and a chart",
    "judge": "judge any JSONL of answers with the evaluation's judges; verdicts and counts",
}
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def commands_help() -> str:
    """The top-level --help: every subcommand with one line."""
    names = [*TRAINER_COMMANDS, *EXTRA_COMMANDS]
    lines = [
        f"usage: {PROG} COMMAND --config FILE [--key value ...]",
        "",
        "SafeGRPO in PyTorch Lightning. Commands:",
    ]
    width = max(len(name) for name in names)
    lines += [f"  {name:<{width}}  {_summary(name)}" for name in names]
    lines += [
        "",
        f"`{PROG} COMMAND --help` lists a command's options; {DEBUG_FLAG} shows tracebacks.",
    ]
    return "\n".join(lines) + "\n"


def _summary(name: str) -> str:
    if name in SUMMARIES:
        return SUMMARIES[name]
    doc = importlib.import_module(EXTRA_COMMANDS[name]).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _unknown_command(word: str) -> str:
    names = [*TRAINER_COMMANDS, *EXTRA_COMMANDS]
    close = closest(word, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"error: unknown command {word!r}{hint}; `{PROG} --help` lists the commands: " + (
        ", ".join(names)
    )


def main(args: Sequence[str] | None = None) -> Any:
    """Run the command line (`args` defaults to sys.argv[1:]): `plan` and `evaluate` go to
    their own entry points, the Trainer commands to LightningCLI."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    if args is None:  # LightningCLI reads sys.argv itself; it must not see --debug
        sys.argv[1:] = argv
    if debug:  # the parsers read it too (they keep their full usage then)
        os.environ[DEBUG_ENV] = "1"
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(commands_help())
        raise SystemExit(0 if argv else 2)
    if not argv[0].startswith("-") and argv[0] not in (*TRAINER_COMMANDS, *EXTRA_COMMANDS):
        sys.stderr.write(_unknown_command(argv[0]) + "\n")
        raise SystemExit(2)
    # Imported here, so that the help above and a mistyped command answer at once.
    from safegrpo_pl.data.datamodule import SafeTagDataModule
    from safegrpo_pl.run.console import show_package_logs, silence_known_notes
    from safegrpo_pl.run.trainer_cli import SafeGRPOCLI
    from safegrpo_pl.train.module import SafeGRPOModule

    silence_known_notes()
    show_package_logs()
    if argv[:1] and argv[0] in EXTRA_COMMANDS:
        command = importlib.import_module(EXTRA_COMMANDS[argv[0]])
        return _report_expected_errors(lambda: command.main(argv[1:]), debug)
    return _report_expected_errors(
        lambda: SafeGRPOCLI(
            SafeGRPOModule,
            SafeTagDataModule,
            parser_kwargs={"parser_mode": "omegaconf", "prog": PROG},
            save_config_kwargs={"overwrite": True},
            args=None if args is None else argv,
        ),
        debug,
    )


def _report_expected_errors(run: Callable[[], Any], debug: bool) -> Any:
    """`run()`, with the project's own errors printed as one message and exit status 1 (the
    traceback only with `--debug` or SAFEGRPO_DEBUG=1); anything unexpected propagates."""
    try:
        return run()
    except Exception as err:
        if debug or not is_expected_error(err):
            raise
        sys.stderr.write(error_message(err) + "\n")
        raise SystemExit(1) from None
