"""Files and terminal output of library code: atomic writes, the cache directory, progress bars.

Every file fatq writes goes through :func:`atomic_path` (a temp file beside the target, renamed
into place on success), so no reader ever sees a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from fatq.errors import FatqError


def cache_dir() -> Path:
    """Where extracted archives, decoded tensors and engine caches live (created on demand).

    ``$FATQ_CACHE_DIR``, else ``~/.cache/fatq``.
    """
    root = Path(os.environ.get("FATQ_CACHE_DIR", Path.home() / ".cache" / "fatq"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write; it replaces ``path`` when the block succeeds.

    The temp name keeps ``path``'s suffix (writers such as matplotlib pick the format from it).
    FatqError when the directory does not exist; on any error the temp file is removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FatqError(f"directory {path.parent} does not exist (for {path.name}).")
    # the pid in the name lets remove_stale_temp_files tell a killed writer's file from a live one's
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


STAGING_MARK = ".staging-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_staging(key: Path) -> None:
    """Remove staging directories of ``key`` left by processes that no longer run (killed mid-write)."""
    prefix = f".{key.name}{STAGING_MARK}"
    for entry in key.parent.iterdir():
        pid = entry.name[len(prefix) :]
        if entry.is_dir() and entry.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def staged_files(targets: Sequence[str | Path]) -> Iterator[dict[Path, Path]]:
    """Write several files as one: yields {target: path to write it to}; moves them all into place on success.

    The files are written in a hidden directory beside the last target (``.<name>.staging-<pid>``) and moved
    into place in ``targets`` order, the last target last: its presence says the set is complete. On an error
    nothing of the set is left and files already at the targets stay as they were. A process killed while
    writing leaves only its staging directory, which the next call for the same last target removes; a kill
    between the moves themselves (renames on one file system, microseconds apart) can leave the earlier
    targets without the last one.
    """
    targets = [Path(t) for t in targets]
    key = targets[-1]
    if not key.parent.is_dir():
        raise FatqError(f"directory {key.parent} does not exist (for {key.name}).")
    _remove_stale_staging(key)
    stage = key.parent / f".{key.name}{STAGING_MARK}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield {target: stage / target.name for target in targets}
        for target in targets:
            os.replace(stage / target.name, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# .<name>.<pid>.<mkstemp's 8 characters>.tmp<suffix>, as atomic_path names its temp files
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp(\.[^.]+)?$")


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temp files of :func:`atomic_path` in ``directory`` whose writer no longer runs (killed mid-write).

    Returns the paths removed.
    """
    removed = []
    for entry in Path(directory).iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match and entry.is_file() and not _alive(int(match.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` atomically (see :func:`atomic_path`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON atomically (see :func:`atomic_path`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", quiet: bool = False, **kwargs):
    """A tqdm bar on stderr, off with ``quiet`` or when stderr is not a terminal."""
    from tqdm.auto import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False, **kwargs)
