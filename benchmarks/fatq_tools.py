"""The fatq commands as the benchmark scripts call them: found on PATH, echoed, exit status checked; the
arguments the engine profilers share."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
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


def profiler_arguments(description: str, runs: int) -> argparse.ArgumentParser:
    """The parser of an engine profiler (``ort_profile.py``, ``openvino_profile.py``): model files, then
    ``--batch``, ``--threads``, ``--warmup`` and ``--runs`` (default ``runs``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("models", nargs="+", type=Path, help="model files")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=runs)
    return parser


def engine_agreement(onnx_path: Path, engine: str, data_dir: Path, threads: int, extra: list[str] = ()) -> dict:
    """Agreement of ``engine`` on a fatq int8 file with the model that engine computes on it: the file's
    ``.reference.pt``, in fatq-bench's deploy mode where the engine rounds the file's float biases to int32
    (:func:`engines.registry.reference_mode`). One short ``fatq-bench`` call; returns its agreement entry
    (``top1_agreement_pct``, ...) plus the ``reference_mode`` used."""
    import onnx

    from engines.registry import reference_mode

    metadata = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    mode = reference_mode(metadata.get("bias_arithmetic"), engine)
    reference = onnx_path.with_name(onnx_path.name.replace(".onnx", ".reference.pt"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "agreement.json"
        command = [tool("fatq-bench"), str(onnx_path), "--engine", engine, "--batch-sizes", "64", "--iterations", "1"]
        command += ["--warmup", "0", "--threads", str(threads), "--data-dir", str(data_dir), "--quiet"]
        command += ["--reference", str(reference), "--reference-mode", mode, "--json", str(out), *extra]
        run_tool(command, ok=(0, 1))
        (found,) = json.loads(out.read_text())["agreement"].values()
    return {**found, "reference_mode": mode}
