"""Errors a person can act on, and how the command line shows them.

The project's own checks (a bad record, a setting out of range, a model or data set that cannot
be found) already say what is wrong and how to fix it; at the command line a traceback under
them is noise. `is_expected_error` tells those apart from bugs: an error of a kind the checks
raise, raised by this package's own code. `main` in `cli.py` prints such an error alone and
exits with status 1; `--debug` or `SAFEGRPO_DEBUG=1` shows the traceback as well.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

DEBUG_ENV = "SAFEGRPO_DEBUG"
DEBUG_FLAG = "--debug"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # safegrpo_pl/
TINY_EXAMPLE = "tiny:qwen2_5_vl"


class ModelNotFoundError(OSError):
    """The model named in the config is neither a local folder nor reachable on the hub."""


def model_not_found(name_or_path: str, err: BaseException) -> ModelNotFoundError:
    """One message for a model that cannot be loaded: the key, what was tried, the choices."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        tried = f"the local folder {str(path)!r}, which has no loadable config.json"
    else:
        tried = f"{name_or_path!r}: not a local folder, and the hub did not provide it"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelNotFoundError(
        f"model.policy.name_or_path: cannot load {tried} ({reason}). Give a local folder "
        "holding a transformers checkpoint (config.json and weights), a hub id this machine can "
        f"download or already has in its Hugging Face cache, or {TINY_EXAMPLE!r} for a tiny "
        "model built offline."
    )


def debug_requested(args: list[str]) -> bool:
    """True when `--debug` is among `args` or `SAFEGRPO_DEBUG` is set to a true value."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return DEBUG_FLAG in args or env not in ("", "0", "false", "no")


def _raised_by_us(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE_DIR)


def is_expected_error(err: BaseException) -> bool:
    """A check of this package failed (as opposed to a bug, here or in a dependency).

    That is a `ModelNotFoundError`, a `FileNotFoundError`, a full disk, or a `ValueError` /
    `KeyError` raised by a line of this package, such as a bad record or a setting out of range.
    """
    if isinstance(err, ModelNotFoundError | FileNotFoundError):
        return True
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, ValueError | KeyError) and _raised_by_us(err)


def error_message(err: BaseException) -> str:
    """The text printed for an expected error, with the way to see its traceback."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return f"error: {text}\n(run again with {DEBUG_FLAG} or {DEBUG_ENV}=1 to see the traceback)"


def _unknown_options(message: str) -> list[str]:
    """The options a parser's error `message` says it does not know, as `--key`."""
    if "unrecognized arguments:" in message:
        words = message.split("unrecognized arguments:", 1)[1].split()
        return [w.split("=", 1)[0] for w in words if w.startswith("-")]
    # jsonargparse, for a key in a config file: "Group 'model' does not accept option 'x'"
    found = [
        f"--{group}.{key}"
        for group, key in re.findall(r"Group '([^']+)' does not accept option '([^']+)'", message)
    ]
    found += re.findall(r"Subcommand '[^']+' does not accept option '([^']+)'", message)
    found += re.findall(r"Option '([^']+)' is not accepted", message)
    return [key if key.startswith("-") else f"--{key}" for key in found]


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to `n` of `choices` close to `word`: similar enough (difflib ratio >= 0.75) and near
    the best match (within 0.05 of its ratio), so that a shared `--model.` prefix alone is not
    a suggestion."""
    scored = sorted(
        ((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in choices), reverse=True
    )
    if not scored or scored[0][0] < 0.75:
        return []
    best = scored[0][0]
    return [c for ratio, c in scored[:n] if ratio >= max(0.75, best - 0.05)]


def parser_error_line(message: str, known: Iterable[str], help_command: str) -> str:
    """One line for a command-line mistake: each unknown option with the closest known ones,
    or the parser's own message on one line, then where the full list is."""
    unknown = _unknown_options(message)
    known = sorted({k for k in known if k.startswith("--")})
    if unknown:
        parts = []
        for option in unknown:
            close = closest(option, known)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            parts.append(f"unknown option {option}{hint}")
        text = "; ".join(parts)
    else:
        text = " ".join(message.split())
    return f"error: {text}; `{help_command}` lists every option"


class OneLineParserErrors:
    """Mixin for an argparse or jsonargparse parser: a mistake on the command line prints one
    line (`parser_error_line`) and exits with status 2, instead of the whole usage.
    Abbreviated options are refused (`--trainer.max_step` is not `--trainer.max_steps`).
    `--debug` / SAFEGRPO_DEBUG=1 keeps the parser's own output."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: BaseException | None = None) -> NoReturn:
        if not getattr(self, "exit_on_error", True) or debug_requested([]):
            # a parser asked to raise (jsonargparse parses nested values so), or --debug
            super().error(*((message,) if ex is None else (message, ex)))  # type: ignore[misc]
        parser = getattr(ex, "subcommand_parser", None) or self  # the subcommand's own options
        known = [s for action in parser._actions for s in action.option_strings]
        command = parser.prog.replace(" [options]", "")
        sys.stderr.write(parser_error_line(message, known, f"{command} --help") + "\n")
        raise SystemExit(2)
