"""Output paths checked before a command starts its work: one sentence instead of a late traceback.

A CLI calls :func:`check_output_file` for each file it will write, right after parsing its
arguments, so a path that is a directory, lies under a regular file, or sits in a directory the
process cannot write (read-only mount, ``chattr +i``; root ignores permission bits, so the check
creates and removes a probe file instead of asking ``os.access``) fails before minutes of work.
The write itself still goes through :func:`fatq.io.atomic_path`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fatq.errors import FatqError


def check_output_file(path: Path | None, what: str) -> None:
    """FatqError unless ``path`` can be written (None: nothing to check).

    Args:
        path: the file a command will write.
        what: what it is, for the message ("JSON report", "output checkpoint").
    """
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise FatqError(f"{path} is a directory; give a file name for the {what}.")
    parent = path.parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise FatqError(f"{blocker} is a file, not a directory (for the {what} {path.name}).")
    if not parent.is_dir():
        raise FatqError(f"directory {parent} does not exist (for the {what} {path.name}).")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
        if path.exists():
            with open(path, "ab"):  # an immutable or read-only existing file cannot be replaced either
                pass
    except OSError as exc:
        raise FatqError(f"cannot write the {what} {path} ({exc.strerror or type(exc).__name__}).") from None


def check_output_dir(path: Path | None, what: str) -> None:
    """FatqError unless directory ``path`` exists and is writable, or can be created (None: nothing to check)."""
    if path is None:
        return
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise FatqError(f"{existing} is a file, not a directory (for the {what} {path}).")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".fatq-", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FatqError(f"cannot write the {what} {path} ({exc.strerror or type(exc).__name__}).") from None


def check_distinct_outputs(outputs: dict[str, Path | None], inputs: list[Path]) -> None:
    """FatqError when two outputs are the same file, or an output would overwrite an input.

    Args:
        outputs: {flag: path} of the files a command will write (None: not asked).
        inputs: files the command reads.
    """
    seen: dict[Path, str] = {Path(p).resolve(): f"the input {p}" for p in inputs}
    for flag, path in outputs.items():
        if path is None:
            continue
        key = Path(path).resolve()
        if key in seen:
            raise FatqError(f"{flag} {path} would overwrite {seen[key]}; choose another file.")
        seen[key] = flag
