"""Errors a person can act on, and how the command line shows them.

The project's own checks (a bad record, a setting out of range, a model or data set that cannot
be found) already say what is wrong and how to fix it; at the command line a traceback under
them is noise. `is_expected_error` tells those apart from bugs: an error of a kind the checks
raise, raised by this package's own code. `main` in `cli.py` prints such an error alone and
exits with status 1; `--debug` or `SAFEGRPO_DEBUG=1` shows the traceback as well.
"""

from __future__ import annotations

import errno
import os
import traceback
from pathlib import Path

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
