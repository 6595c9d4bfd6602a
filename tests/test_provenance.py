"""A report names the commit that produced it, and never a wrong one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from safegrpo_pl.run.provenance import code_version, describe

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


def _git(repo: Path, *args: str) -> str:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git work tree laid out as ours: the package in src/safegrpo_pl, committed."""
    package = tmp_path / "repo" / "src" / "safegrpo_pl"
    package.mkdir(parents=True)
    (package / "module.py").write_text("x = 1\n")
    _git(tmp_path / "repo", "init", "-q")
    _git(tmp_path / "repo", "add", "-A")
    _git(tmp_path / "repo", "commit", "-qm", "first")
    return package


def test_a_checkout_reports_its_commit_and_whether_tracked_files_changed(checkout):
    version = code_version(checkout)
    assert version["commit"] == _git(checkout, "rev-parse", "--short", "HEAD")
    assert version["dirty"] is False
    (checkout.parents[1] / "notes.txt").write_text("untracked\n")
    assert code_version(checkout)["dirty"] is False, "an untracked file elsewhere is not code"
    (checkout / "new_module.py").write_text("y = 1\n")
    assert code_version(checkout)["dirty"] is True, "an uncommitted module changes the code"
    (checkout / "new_module.py").unlink()
    (checkout / "module.py").write_text("x = 2\n")
    assert code_version(checkout)["dirty"] is True
    assert describe(code_version(checkout)).endswith("(with uncommitted changes)")


def test_an_untracked_copy_in_another_checkouts_src_reports_no_commit(checkout, tmp_path):
    other = tmp_path / "other"
    (other / "README").parent.mkdir()
    (other / "README").write_text("another project\n")
    _git(other, "init", "-q")
    _git(other, "add", "-A")
    _git(other, "commit", "-qm", "theirs")
    shutil.copytree(checkout, other / "src" / "safegrpo_pl")
    assert code_version(other / "src" / "safegrpo_pl")["commit"] is None


def test_an_installed_copy_inside_some_checkout_reports_no_commit(checkout):
    # A virtual environment inside a user's repository: the copy in site-packages is not the
    # code that repository's HEAD holds.
    installed = checkout.parents[1] / ".venv" / "lib" / "site-packages" / "safegrpo_pl"
    shutil.copytree(checkout, installed)
    version = code_version(installed)
    assert version["commit"] is None and version["dirty"] is None, version
    assert describe(version) == f"safegrpo-pl {version['package']}"


def test_a_folder_outside_any_repository_reports_no_commit(tmp_path):
    folder = tmp_path / "src" / "safegrpo_pl"
    folder.mkdir(parents=True)
    assert code_version(folder)["commit"] is None
