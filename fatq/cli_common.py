"""What every fatq command-line tool shares: one argparse error policy and the exit-status wrapper.

Bad usage and user errors print one sentence on stderr (``PROG: error: ...``) and exit 2, with
no traceback and no usage dump; library code raises :class:`fatq.errors.FatqError` for them.
Files and progress bars of library code are in :mod:`fatq.io`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from fatq.errors import FatqError


class SentenceParser(argparse.ArgumentParser):
    """argparse whose usage errors become one-sentence :class:`FatqError`s (exit 2 via :func:`run_cli`)."""

    def error(self, message: str):
        raise FatqError(f"{message} (see {self.prog} --help).")


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; user errors print one sentence on stderr and exit 2 (no traceback)."""
    try:
        return main(argv)
    except FatqError as exc:
        prog = Path(sys.argv[0]).name or "fatq"
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file system refusal the checks before the work did not foresee (disk full, ...)
        prog = Path(sys.argv[0]).name or "fatq"
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or type(exc).__name__}{where}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
