"""Writing a folder atomically: published once (caches) or replaced each time (exports)."""

from __future__ import annotations

from pathlib import Path

import pytest

from safegrpo_pl.core.files import atomic_file, atomic_folder


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_published_folder_appears_whole_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "entry"
    with atomic_folder(target, replace=False, complete_marker="done") as tmp:
        (tmp / "weights").write_text("ours")
        assert not target.exists(), "the target appeared before the block finished"
        (tmp / "done").write_text("")
    assert (target / "weights").read_text() == "ours", "the folder was not published"
    assert _leftovers(target.parent) == [], "a temporary folder was left beside the target"


def test_a_concurrent_publisher_wins_and_ours_is_dropped(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    with atomic_folder(target, replace=False, complete_marker="done") as tmp:
        (tmp / "weights").write_text("ours")
        target.mkdir()  # another process publishes the same entry meanwhile
        (target / "weights").write_text("theirs")
        (target / "done").write_text("")
    assert (target / "weights").read_text() == "theirs", "a complete published folder was lost"
    assert _leftovers(tmp_path) == [], "our dropped copy was left behind"


def test_an_incomplete_folder_in_the_way_is_an_error(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    target.mkdir()
    (target / "half").write_text("")  # no completion marker: not a usable folder
    with (
        pytest.raises(OSError),
        atomic_folder(target, replace=False, complete_marker="done") as tmp,
    ):
        (tmp / "done").write_text("")
    assert _leftovers(tmp_path) == [], "the temporary folder was left behind after the error"


def test_replace_swaps_the_previous_folder_out(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    for version in ("first", "second"):
        with atomic_folder(target, replace=True) as tmp:
            (tmp / version).write_text(version)
    assert sorted(p.name for p in target.iterdir()) == ["second"], "old files survived"
    assert _leftovers(tmp_path) == [], "the previous folder or a temporary one was left behind"


def test_a_failing_block_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old").write_text("kept")
    with pytest.raises(RuntimeError), atomic_folder(target, replace=True) as tmp:
        (tmp / "new").write_text("")
        raise RuntimeError("save failed")
    assert sorted(p.name for p in target.iterdir()) == ["old"], "a failed export touched the target"
    assert _leftovers(tmp_path) == [], "the temporary folder of a failed export was left behind"


def test_a_file_written_whole_replaces_the_target_and_a_failure_keeps_it(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    target.write_text("before")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "before", "a failed write must leave the previous file"
    with atomic_file(target, fsync=True) as tmp:
        tmp.write_text("after")
    assert target.read_text() == "after"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"], "no temporary file left"


def test_partial_files_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (tmp_path / f".last.ckpt.{dead}.tmp").write_text("half of a killed write")
    (tmp_path / f".last.ckpt.{os.getppid()}.tmp").write_text("a live writer's file")
    with atomic_file(tmp_path / "last.ckpt") as tmp:
        tmp.write_text("whole")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".last.ckpt.{os.getppid()}.tmp", "last.ckpt"], names
