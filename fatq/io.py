"""Files and terminal output of library code: atomic writes, the cache directory, progress bars.

Every file fatq writes goes through :func:`atomic_path` (a temp file beside the target, renamed
into place on success), so no reader ever sees a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
