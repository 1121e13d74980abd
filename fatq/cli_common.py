"""What every fatq command-line tool shares: error handling, progress bars, atomic JSON."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from fatq.errors import FatqError


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; user errors print one sentence on stderr and exit 2 (no traceback)."""
    try:
        return main(argv)
    except FatqError as exc:
        prog = Path(sys.argv[0]).name or "fatq"
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", quiet: bool = False, **kwargs):
    """A tqdm bar on stderr, off with ``quiet`` or when stderr is not a terminal."""
    from tqdm.auto import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False, **kwargs)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it into place (no half-written file)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FatqError(f"directory {path.parent} does not exist (for {path.name}).")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON atomically (see :func:`write_bytes_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
