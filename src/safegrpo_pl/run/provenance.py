"""Which code produced a run: the package version and, in a git checkout, the commit.

A report's figures are only worth as much as the knowledge of what made them: `summary.json`
and `summary.md` carry `code_version()`, so a figure pasted into an issue or a README can be
traced to its commit without anyone writing it down by hand.

The commit is read only when the imported package is the tracked `src/safegrpo_pl` folder of the
git work tree it sits in (an editable install or `PYTHONPATH=src`). An installed copy (a wheel in
`site-packages`) may differ from any checkout around it, even one that holds its virtual
environment, so it reports no commit rather than a wrong one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import safegrpo_pl


def _git(folder: Path, *args: str) -> str | None:
    """`git -C folder args...`'s output, stripped; None when git or the repository is absent.

    `--no-optional-locks`: reading the status must not take the index lock from under a git
    command the user runs at the same time."""
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(folder), *args],
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(package_dir: str | Path | None = None) -> dict[str, Any]:
    """`{"package": version, "commit": short hash or None, "dirty": bool or None}`.

    `dirty` is true when tracked files anywhere in the work tree differ from the commit, or
    when the package folder holds files git does not track (an uncommitted module changes the
    code; an untracked file elsewhere does not). None: git could not tell. `package_dir`
    defaults to the imported package's folder. Never raises: a report must not be lost to it.
    """
    unknown = {"package": safegrpo_pl.__version__, "commit": None, "dirty": None}
    version: dict[str, Any] = dict(unknown)
    try:
        folder = Path(package_dir or Path(safegrpo_pl.__file__).parent).resolve()
        top = _git(folder, "rev-parse", "--show-toplevel")
        if top is None or (Path(top).resolve() / "src" / folder.name) != folder:
            return unknown
        if _git(folder, "ls-files", "--error-unmatch", "--", ".") is None:
            return unknown  # a copy git does not track: that checkout's HEAD is not its code
        version["commit"] = _git(folder, "rev-parse", "--short", "HEAD")
        tracked = _git(folder, "status", "--porcelain", "--untracked-files=no")
        untracked = _git(folder, "status", "--porcelain", "--untracked-files=all", "--", ".")
        if tracked is not None and untracked is not None:
            version["dirty"] = bool(tracked) or any(
                line.startswith("??") for line in untracked.splitlines()
            )
    except Exception:  # provenance is a courtesy: the report comes first
        return unknown
    return version


def describe(version: dict[str, Any]) -> str:
    """One line for a report: `safegrpo-pl 0.1.0, commit abc1234 (with uncommitted changes)`."""
    text = f"safegrpo-pl {version['package']}"
    if version.get("commit"):
        text += f", commit {version['commit']}"
        if version.get("dirty") is None:
            text += " (uncommitted changes unknown)"
        elif version["dirty"]:
            text += " (with uncommitted changes)"
    return text
