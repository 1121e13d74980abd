"""The fatq commands as the benchmark scripts call them: found on PATH, echoed, exit status checked."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def _script() -> str:
    return Path(sys.argv[0]).name


def tool(name: str, extra: str = "") -> str:
    """The path of console script ``name``; exits with one sentence when fatq is not installed."""
    path = shutil.which(name)
    if path is None:
        sys.exit(f"{_script()}: {name} is not on PATH; install fatq with `pip install -e '.{extra}'`.")
    return path


def run_tool(command: list[str], ok=(0,)) -> int:
    """Echo and run ``command``; exits with one sentence unless its status is in ``ok`` (returned)."""
    print("$", " ".join(command), flush=True)
    code = subprocess.run(command).returncode
    if code not in ok:
        sys.exit(f"{_script()}: {Path(command[0]).name} failed with exit status {code}.")
    return code
