"""Which code produced a run: the package version and, in a git checkout, the commit.

A report's figures are only worth as much as the knowledge of what made them: `summary.json`
and `summary.md` carry `code_version()`, so a figure pasted into an issue or a README can be
traced to its commit without anyone writing it down by hand.

The commit is read only when the imported package is the `src/safegrpo_pl` folder of the git
work tree it sits in (an editable install or `PYTHONPATH=src`). An installed copy (a wheel in
`site-packages`) may differ from any checkout around it, even one that holds its virtual
environment, so it reports no commit rather than a wrong one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import safegrpo_pl


def _git(folder: Path, *args: str) -> str | None:
    """`git -C folder args...`'s output, stripped; None when git or the repository is absent."""
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(package_dir: str | Path | None = None) -> dict[str, Any]:
    """`{"package": version, "commit": short hash or None, "dirty": bool or None}`.

    `dirty` is true when tracked files differ from the commit (untracked files do not count).
    `package_dir` defaults to the imported package's folder.
    """
    folder = Path(package_dir or Path(safegrpo_pl.__file__).parent).resolve()
    version = {"package": safegrpo_pl.__version__, "commit": None, "dirty": None}
    top = _git(folder, "rev-parse", "--show-toplevel")
    if top is None or (Path(top).resolve() / "src" / folder.name) != folder:
        return version
    commit = _git(folder, "rev-parse", "--short", "HEAD")
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    version["commit"] = commit
    version["dirty"] = None if status is None else bool(status)
    return version


def describe(version: dict[str, Any]) -> str:
    """One line for a report: `safegrpo-pl 0.1.0, commit abc1234 (with uncommitted changes)`."""
    text = f"safegrpo-pl {version['package']}"
    if version.get("commit"):
        text += f", commit {version['commit']}"
        if version.get("dirty"):
            text += " (with uncommitted changes)"
    return text
