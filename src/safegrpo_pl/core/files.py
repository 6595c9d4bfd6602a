"""Files and folders the project writes for later runs: where the cache lives, and writing a
file or a folder whole.

Three places publish a folder that another process (or a later run) loads with
`from_pretrained`: the tiny-model cache, the format warm-up cache and the exported policy. A
reader must never see half of one, so each is written into a temporary folder beside its
target and renamed into place (a rename within one file system is atomic). `atomic_folder`
is that one pattern, with the two ways of meeting an existing target:

- a cache entry is published once: processes that build the same entry at the same time (DDP
  ranks, test workers) all build it, the first rename wins, the others' copies are dropped;
- an export is replaced every time: the previous folder is moved aside, the new one renamed in,
  the old one removed.

`atomic_file` is the same for one file (a report, a rewritten answers file): a process killed
while it writes leaves the previous file, never half of the new one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TRAINED_MARKER = "safegrpo_trained.json"
"""Written into every model folder this project exports: its presence says the weights are
already trained (warmed up, then GRPO), so a later run must not warm them up again."""


def default_cache_dir() -> Path:
    """Where built folders are cached (tiny models, warm-ups, benchmark runs).

    `$SAFEGRPO_CACHE`, or `~/.cache/safegrpo_pl` when it is not set.
    """
    return Path(os.environ.get("SAFEGRPO_CACHE", Path.home() / ".cache" / "safegrpo_pl"))


def is_inside_cache(path: str | os.PathLike[str]) -> bool:
    """True for a folder under `default_cache_dir()` (one the user may clear at any time)."""
    return Path(path).resolve().is_relative_to(default_cache_dir().resolve())


@contextmanager
def atomic_folder(
    target: str | os.PathLike[str],
    *,
    replace: bool,
    complete_marker: str | None = None,
) -> Iterator[Path]:
    """Yield an empty folder to fill; when the block ends without error it becomes `target`.

    The folder is created beside `target` (its parent is created if needed) with the usual
    permissions of a folder (mkdtemp's are private) and this process's pid in its name, so the
    next writer of `target` removes what a killed process left. If the block raises, the
    folder is removed and `target` is left as it was.

    Args:
        target: the folder to publish.
        replace: True to replace an existing `target` (an export rewritten at each checkpoint).
            False to publish once (a cache entry): if another process has published `target`
            meanwhile, ours is dropped and theirs kept, as it holds the same content.
        complete_marker: with `replace=False`, a file whose presence in `target` shows that the
            other process's folder is complete; without it, any existing `target` counts.

    Raises:
        OSError: the rename failed and `target` is not a complete folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-{os.getpid()}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published folder should not be
    _remove_partials(target, f".{target.name}-*-*", lambda p: shutil.rmtree(p, True))
    try:
        yield tmp
        if replace:
            _swap_in(tmp, target)
        else:
            try:
                os.replace(tmp, target)
            except OSError:  # another process published it first; theirs is as good as ours
                published = target / complete_marker if complete_marker else target
                if not published.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write; when the block ends without error it
    replaces `target` (a rename, atomic within one file system).

    The temporary file is `.<name>.<pid>.tmp`, so a glob for `*<suffix>` never sees it; give a
    writer that picks its format by suffix (matplotlib) the format. Partial files that killed
    processes left beside `target` are removed after a successful write.

    Args:
        target: the file to publish.
        fsync: flush the file to the disk before the rename (a checkpoint must survive a crash
            of the machine, not only of the process).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:
            descriptor = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _remove_partials(target, f".{target.name}.*.tmp", lambda p: p.unlink(missing_ok=True))


def _remove_partials(target: Path, pattern: str, remove: Callable[[Path], object]) -> None:
    """Remove the temporary files or folders beside `target` that killed processes left: the
    ones matching `pattern` whose name holds the pid of a process no longer running."""
    start = len(target.name) + 2
    for partial in target.parent.glob(pattern):
        pid = re.split(r"[.-]", partial.name[start:], maxsplit=1)[0]
        if pid.isdigit() and not _running(int(pid)):
            remove(partial)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _swap_in(new: Path, target: Path) -> None:
    """Rename `new` to `target`, moving an existing `target` aside first and then removing it."""
    old = target.with_name(f".{target.name}-old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
