"""`safegrpo-pl fit|validate|test|predict|plan|evaluate --config FILE` (or
`python -m safegrpo_pl ...`): the entry point. The Trainer commands go to LightningCLI
(`run.trainer_cli.SafeGRPOCLI`), `plan` and `evaluate` to their own parsers; the project's own
errors print as one message and exit with status 1 (`--debug` or `SAFEGRPO_DEBUG=1` shows the
traceback).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from safegrpo_pl.core.errors import DEBUG_FLAG, debug_requested, error_message, is_expected_error
from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.run.console import show_package_logs, silence_known_notes
from safegrpo_pl.run.trainer_cli import SafeGRPOCLI
from safegrpo_pl.train.module import SafeGRPOModule

__all__ = ["SafeGRPOCLI", "main"]


# Subcommands that are not Trainer commands: each reads the same kind of YAML, with its own parser.
EXTRA_COMMANDS = {
    "plan": "safegrpo_pl.plan.cli",  # a per-GPU memory estimate of a `fit` config
    "evaluate": "safegrpo_pl.eval.cli",  # benchmarks, judges, base vs tuned report
}


def main(args: Sequence[str] | None = None) -> Any:
    """Run the command line (`args` defaults to sys.argv[1:]): `plan` and `evaluate` go to
    their own entry points, the Trainer commands to LightningCLI."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    if args is None:  # LightningCLI reads sys.argv itself; it must not see --debug
        sys.argv[1:] = argv
    silence_known_notes()
    show_package_logs()
    if argv[:1] and argv[0] in EXTRA_COMMANDS:
        command = importlib.import_module(EXTRA_COMMANDS[argv[0]])
        return _report_expected_errors(lambda: command.main(argv[1:]), debug)
    return _report_expected_errors(
        lambda: SafeGRPOCLI(
            SafeGRPOModule,
            SafeTagDataModule,
            parser_kwargs={"parser_mode": "omegaconf"},
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
