#!/usr/bin/env python3
"""Bad-input sweep of the fatq command-line tools (fatq-train, -export, -bench, -ptq, -import).

What it checks
--------------
The project's rule for bad input (README, docs/architecture.md: ``fatq/cli_common.py``): a command
given bad input **exits 2**, prints **one clear sentence** on stderr (no Python traceback, no
argparse usage dump; a one-line ``prog: error: ...`` is fine) and **leaves no partial output**.

Every case of the table below runs the console script as a subprocess (120 s timeout) in a fresh
temporary working directory that holds ``somefile`` (a regular file) and ``existing_dir/`` (an empty
directory), and, where a case needs it, ``ro/``: a directory made immutable with ``chattr +i`` (root
ignores permission bits; the cases are skipped with a note where chattr fails). The set of files in
that working directory and in the fixture directory (where default outputs beside a checkpoint would
land) is compared before and after; the cache directory (``FATQ_CACHE_DIR``) is excluded. A case
passes when the exit status, the stderr and the file sets all follow the rule.

Verdicts: PASS; FAIL (the command broke the rule); HAND (a judgement call: the command chose to warn
or to report a finding rather than refuse; check by hand); SKIP (the harness cannot set the case up
here). Cases of the group ``control`` are valid commands that must exit 0: they show the fixtures work,
so a FAIL elsewhere is the command's, not the harness's.

Classes of bad input: output paths (an existing directory, a path under a regular file, a missing
parent directory, an immutable directory, an output equal to an input, an existing run), outputs
written before validation, argument errors, malformed checkpoints, malformed ONNX files, OpenVINO
load errors, malformed and mismatched datasets.

Fixtures (built once, reused by every case): a tiny synthetic image folder with CIFAR-10's class
names (10 x 4 train / 10 x 2 test JPEGs: training the fixture takes seconds instead of minutes; pass
``--fixture-data real`` to train on ``$FATQ_DATA_DIR`` instead), a W4A4 ResNet-20 fatq checkpoint
(``fatq-train --max-steps 1``) from the public FP32 ResNet-20, its int8 ONNX file (``fatq-export``),
the same checkpoint with float edge inputs (which export must calibrate), an FP32 ResNet-56 fatq
checkpoint, and the malformed checkpoints, ONNX files and datasets derived from them. Every command
runs with light flags (``fatq-train --max-steps 1``, ``fatq-bench --iterations 1 --warmup 0 --limit 64``,
``--check-images 8``, ...) so that a check a command lacks costs seconds, not minutes.

How to run
----------
::

    FATQ_PRETRAINED_DIR=../shared/pretrained python tools/bad_input_sweep.py --json /tmp/sweep-result.json
    python tools/bad_input_sweep.py --only 'bench\\.' --fixtures /tmp/sweep-fixtures --keep   # a subset, kept

``--pretrained-dir`` (default ``$FATQ_PRETRAINED_DIR``) must hold resnet20-cifar10-fp32.th,
resnet56-cifar10-fp32.th and fat-reference/resnet_20_4bit.pth.tar. ``--fixtures DIR`` builds the
fixtures there once and reuses them on the next run; ``--keep`` keeps every case's working directory
(printed with each FAIL) for re-running its command by hand. ``--list`` prints the cases.
Exit status: 0 no FAIL, 1 at least one FAIL, 3 the fixtures could not be built.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TIMEOUT_S = 120
FIXTURE_VERSION = "4"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CLIS = ("fatq-train", "fatq-export", "fatq-bench", "fatq-ptq", "fatq-import")
SEED_2_70 = str(2**70)

# Flags that keep every command light (a case's own flags come after them, so argparse's "last one
# wins" lets a case override any of them).
LIGHT = {
    "fatq-train": ["--max-steps", "1", "--batch-size", "16", "--device", "cpu", "--quiet"],
    "fatq-export": ["--quiet"],
    "fatq-bench": shlex.split("--iterations 1 --warmup 0 --rounds 1 --batch-sizes 1 --limit 64 --threads 1 --quiet"),
    "fatq-ptq": ["--calib-batches", "1", "--batch-size", "8", "--eval-batch-size", "64", "--quiet"],
    "fatq-import": [],
}
CHECK = ["--check", "--check-images", "8"]


# --- the case table ------------------------------------------------------------------------------


@dataclass
class Case:
    """One command to run and what it must do.

    ``args`` may name fixtures as ``{name}`` (see :func:`build_fixtures`). ``expect``: ``error`` (exit 2,
    one sentence, nothing written), ``error-or-warning`` (that, or exit 0 with a warning: HAND; a silent
    exit 0 fails), ``hand`` (that, or any other clean outcome: HAND), ``ok`` (a control: exit 0).
    ``setup``: ``immutable`` (make ``ro/``), ``copy:FIXTURE:NAME`` (copy a fixture into the working dir),
    ``mkdir:NAME`` (an empty directory).
    """

    group: str
    name: str
    cli: str
    args: list[str]
    expect: str = "error"
    setup: tuple[str, ...] = ()
    light: bool = True
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.cli.removeprefix('fatq-')}.{self.group}.{self.name}"


TRAIN = ["--arch", "resnet20", "--bits", "4", "--pretrained", "{fp32}", "--data-dir", "{data}", "--job-dir", "job"]
EVAL = ["--eval-only", "{ckpt}", "--data-dir", "{data}"]
EXPORT = ["{ckpt}", "-o", "out.onnx"]
FEXPORT = ["{fckpt}", "-o", "out.onnx"]  # a checkpoint with float edge inputs: export must calibrate them
BENCH = ["{onnx}"]
PTQ = ["{fp32}", "--arch", "resnet20", "--bits", "8", "--data-dir", "{data}", "-o", "out.pt"]
IMPORT = ["{fatref}", "--arch", "resnet20", "--bits", "4", "-o", "out.pt"]


def swap(args: list[str], flag: str | int, value: str) -> list[str]:
    """``args`` with the value after ``flag`` replaced; ``flag`` 0 replaces the leading positional argument."""
    out = list(args)
    out[0 if flag == 0 else out.index(flag) + 1] = value
    return out


def drop(args: list[str], flag: str) -> list[str]:
    """``args`` without ``flag`` and its value."""
    i = args.index(flag)
    return args[:i] + args[i + 2 :]


def control_cases() -> list[Case]:
    """Valid commands that must succeed: evidence that the fixtures and the harness work."""
    g = "control"
    return [
        Case(g, "lint-clean", "fatq-export", ["--lint", "{onnx}"], "ok"),
        Case(g, "export", "fatq-export", EXPORT, "ok"),
        Case(
            g, "export-float-edges", "fatq-export", [*FEXPORT, "--calib-data", "{data}", "--calib-batches", "1"], "ok"
        ),
        Case(g, "bench-onnx", "fatq-bench", [*BENCH, "--data-dir", "{data}", "--reference", "{ref}"], "ok"),
        Case(g, "bench-openvino", "fatq-bench", [*BENCH, "--engine", "openvino"], "ok"),
        Case(g, "bench-ckpt", "fatq-bench", ["{ckpt}"], "ok"),
        Case(g, "train-eval", "fatq-train", EVAL, "ok"),
        Case(g, "ptq", "fatq-ptq", PTQ, "ok"),
        Case(g, "import", "fatq-import", IMPORT, "ok"),
    ]


# (flag value, setup) of each bad output location; "{ext}" is the file's extension
OUTPUT_KINDS = {
    "existing-dir": ("existing_dir", ()),
    "under-file": ("somefile/x.{ext}", ()),
    "missing-parent": ("nodir/x.{ext}", ()),
    "immutable-dir": ("ro/x.{ext}", ("immutable",)),
}

# (cli, flag, extension, args before the flag)
OUTPUT_FLAGS = [
    ("fatq-export", "-o", "onnx", ["{ckpt}"]),
    ("fatq-export", "--json", "json", EXPORT),
    ("fatq-bench", "--json", "json", BENCH),
    ("fatq-bench", "--markdown", "md", BENCH),
    ("fatq-bench", "--plot", "png", BENCH),
    ("fatq-ptq", "-o", "pt", drop(PTQ, "-o")),
    ("fatq-ptq", "--json", "json", PTQ),
    ("fatq-import", "-o", "pt", drop(IMPORT, "-o")),
    ("fatq-train", "--json", "json", TRAIN),
    ("fatq-train", "--json", "json", EVAL),
]


def output_path_cases() -> list[Case]:
    """Output files and directories that cannot be written, or that would overwrite an input."""
    cases = []
    for cli, flag, ext, before in OUTPUT_FLAGS:
        mode = "eval-" if "--eval-only" in before else ""
        for kind, (value, setup) in OUTPUT_KINDS.items():
            cases.append(
                Case(
                    "output",
                    f"{mode}{flag.lstrip('-')}-{kind}",
                    cli,
                    [*before, flag, value.format(ext=ext)],
                    setup=setup,
                )
            )
    g, train = "output", drop(TRAIN, "--job-dir")
    cases += [
        Case(g, "job-dir-is-file", "fatq-train", [*train, "--job-dir", "somefile"]),
        Case(g, "job-dir-under-file", "fatq-train", [*train, "--job-dir", "somefile/job"]),
        Case(g, "job-dir-immutable", "fatq-train", [*train, "--job-dir", "ro/job"], setup=("immutable",)),
        Case(g, "job-dir-immutable-itself", "fatq-train", [*train, "--job-dir", "ro"], setup=("immutable",)),
        Case(
            g,
            "job-dir-missing-parent",
            "fatq-train",
            [*train, "--job-dir", "nodir/sub/job"],
            "hand",
            note="creating the parents (mkdir -p) is a reasonable choice",
        ),
        Case(g, "job-dir-holds-a-run", "fatq-train", [*train, "--job-dir", "oldjob"], setup=("copy:job:oldjob",)),
        # an output that is an input, or two outputs that are one file
        Case(g, "o-is-the-checkpoint", "fatq-export", ["model.pt", "-o", "model.pt"], setup=("copy:ckpt:model.pt",)),
        Case(g, "o-equals-json", "fatq-export", [*EXPORT, "--json", "out.onnx"]),
        Case(
            g,
            "json-is-the-model",
            "fatq-bench",
            ["model.onnx", "--json", "model.onnx"],
            setup=("copy:onnx:model.onnx",),
        ),
        Case(g, "json-equals-markdown", "fatq-bench", [*BENCH, "--json", "r.txt", "--markdown", "r.txt"]),
        Case(
            g,
            "json-is-the-reference",
            "fatq-bench",
            [*BENCH, "--reference", "ref.pt", "--json", "ref.pt"],
            setup=("copy:ref:ref.pt",),
        ),
        Case(
            g,
            "o-is-the-checkpoint",
            "fatq-ptq",
            swap(swap(PTQ, 0, "model.th"), "-o", "model.th"),
            setup=("copy:fp32:model.th",),
        ),
        Case(g, "o-equals-json", "fatq-ptq", [*PTQ, "--json", "out.pt"]),
        Case(
            g,
            "o-is-the-checkpoint",
            "fatq-import",
            swap(swap(IMPORT, 0, "ref.pth.tar"), "-o", "ref.pth.tar"),
            setup=("copy:fatref:ref.pth.tar",),
        ),
        Case(
            g,
            "eval-json-is-the-checkpoint",
            "fatq-train",
            ["--eval-only", "model.pt", "--data-dir", "{data}", "--json", "model.pt"],
            setup=("copy:ckpt:model.pt",),
        ),
        Case(
            g,
            "json-is-the-pretrained",
            "fatq-train",
            [*swap(TRAIN, "--pretrained", "model.th"), "--json", "model.th"],
            setup=("copy:fp32:model.th",),
        ),
    ]
    return cases


def early_write_cases() -> list[Case]:
    """Bad input noticed late: nothing of the outputs (e.g. out.onnx and its companions) may remain."""
    g = "early-write"
    return [
        Case(g, "json-missing-parent", "fatq-export", [*EXPORT, "--json", "nodir/r.json"]),
        Case(g, "check-data-missing", "fatq-export", [*EXPORT, *CHECK, "--data-dir", "nope"]),
        Case(g, "float-edges-no-calib-data", "fatq-export", FEXPORT),
        Case(g, "float-edges-calib-data-missing", "fatq-export", [*FEXPORT, "--calib-data", "nope"]),
        Case(g, "float-edges-calib-data-empty", "fatq-export", [*FEXPORT, "--calib-data", "{empty_dir}"]),
        Case(g, "float-edges-calib-data-random-tar-gz", "fatq-export", [*FEXPORT, "--calib-data", "{badtar}"]),
        Case(
            g,
            "float-edges-calib-data-3-classes",
            "fatq-export",
            [*FEXPORT, "--calib-data", "{three_class}"],
            "hand",
            note="calibration reads only images; the class count may not matter",
        ),
        Case(
            g,
            "float-edges-calib-method-bogus",
            "fatq-export",
            [*FEXPORT, "--calib-data", "{data}", "--calib-method", "bogus"],
        ),
        Case(
            g,
            "float-edges-calib-batches-0",
            "fatq-export",
            [*FEXPORT, "--calib-data", "{data}", "--calib-batches", "0"],
        ),
        Case(g, "format-trt-no-tensorrt", "fatq-export", ["{ckpt}", "-o", "out.plan", "--format", "trt"]),
        Case(g, "format-trt-onnx-suffix", "fatq-export", ["{ckpt}", "-o", "out.onnx", "--format", "trt"]),
        Case(g, "json-existing-dir-with-check", "fatq-export", [*EXPORT, *CHECK, "--json", "existing_dir"]),
        Case(
            g,
            "default-output-beside-ckpt",
            "fatq-export",
            ["model.pt", "--json", "nodir/r.json"],
            setup=("copy:ckpt:model.pt",),
        ),
        Case(
            g,
            "json-data-missing",
            "fatq-bench",
            [*BENCH, "--json", "r.json", "--markdown", "r.md", "--data-dir", "nope"],
        ),
        Case(g, "json-engine-trt", "fatq-bench", [*BENCH, "--json", "r.json", "--engine", "trt"]),
        Case(g, "json-engine-ort-cuda", "fatq-bench", [*BENCH, "--json", "r.json", "--engine", "ort-cuda"]),
        Case(g, "json-plot-missing-parent", "fatq-bench", [*BENCH, "--json", "r.json", "--plot", "nodir/p.png"]),
        Case(g, "json-reference-missing", "fatq-bench", [*BENCH, "--json", "r.json", "--reference", "nope.pt"]),
        Case(g, "json-missing-parent", "fatq-ptq", [*PTQ, "--json", "nodir/r.json"]),
        Case(
            g,
            "quantized-source",
            "fatq-ptq",
            [*swap(PTQ, 0, "{ckpt}"), "--json", "r.json"],
            "hand",
            note="PTQ of an already quantized checkpoint",
        ),
        Case(g, "json-missing-parent", "fatq-train", [*TRAIN, "--json", "nodir/m.json"]),
        Case(g, "data-missing", "fatq-train", swap(TRAIN, "--data-dir", "nope")),
        Case(g, "lr-inf", "fatq-train", [*TRAIN, "--lr", "inf"]),
        Case(g, "pretrained-random-bytes", "fatq-train", swap(TRAIN, "--pretrained", "{ckpt_random}")),
        Case(g, "arch-differs-from-file", "fatq-import", swap(IMPORT, "--arch", "resnet32")),
        Case(g, "bits-32-on-4-bit-file", "fatq-import", swap(IMPORT, "--bits", "32")),
    ]


UNUSED_CALIB = (
    "the checkpoint needs no calibration, so the flag is not used; the same value is refused for a "
    "float-edge checkpoint (early-write.float-edges-*)"
)


def _flag_cases(cli: str, base: list[str], table: list[tuple[str, list[str]]], expect: str = "error") -> list[Case]:
    return [Case("args", name, cli, [*base, *extra], expect) for name, extra in table]


def argument_cases() -> list[Case]:
    """Flag values out of range, unknown, missing or contradictory."""
    cases = _flag_cases(
        "fatq-train",
        TRAIN,
        [
            ("unknown-flag", ["--bogus-flag"]),
            ("arch-bogus", ["--arch", "nosuchnet"]),
            ("bits-1", ["--bits", "1"]),
            ("bits-9", ["--bits", "9"]),
            ("bits-33", ["--bits", "33"]),
            ("bits-abc", ["--bits", "abc"]),
            ("weight-bits-0", ["--weight-bits", "0"]),
            ("act-bits-16", ["--act-bits", "16"]),
            ("seed-2**70", ["--seed", SEED_2_70]),
            ("seed-negative", ["--seed", "-1"]),
            ("image-size-0", ["--image-size", "0"]),
            ("image-size-negative", ["--image-size", "-3"]),
            ("lr-inf", ["--lr", "inf"]),
            ("lr-nan", ["--lr", "nan"]),
            ("lr-minus-inf", ["--lr=-inf"]),
            ("epochs-0", ["--epochs", "0"]),
            ("epochs-negative", ["--epochs", "-1"]),
            ("max-steps-negative", ["--max-steps", "-1"]),
            ("batch-size-negative", ["--batch-size", "-16"]),
            ("batch-size-0", ["--batch-size", "0"]),
            ("workers-negative", ["--workers", "-1"]),
            ("save-every-negative", ["--save-every", "-1"]),
            ("milestones-abc", ["--milestones", "abc"]),
            ("milestones-empty", ["--milestones", ""]),
            ("milestones-nan", ["--milestones", "nan"]),
            ("weight-decay-nan", ["--weight-decay", "nan"]),
            ("momentum-inf", ["--momentum", "inf"]),
            ("momentum-nan", ["--momentum", "nan"]),
            ("label-smoothing-2", ["--label-smoothing", "2"]),
            ("label-smoothing-nan", ["--label-smoothing", "nan"]),
            ("edge-inputs-bogus", ["--edge-inputs", "int4"]),
            ("shortcut-C", ["--shortcut", "C"]),
            ("dataset-bogus", ["--dataset", "mnist"]),
            ("device-cuda-without-gpu", ["--device", "cuda"]),
            ("gpu-decode-on-cpu", ["--gpu-decode"]),
            ("download-imagefolder", ["--download", "--dataset", "imagefolder"]),
            ("resume-empty-job-dir", ["--resume", "--job-dir", "existing_dir"]),
        ],
    )
    cases += _flag_cases(
        "fatq-train",
        TRAIN,
        [
            ("lr-negative", ["--lr", "-0.1"]),
            ("weight-decay-negative", ["--weight-decay", "-1"]),
            ("momentum-negative", ["--momentum", "-0.5"]),
        ],
        "hand",
    )
    g = "args"
    cases += [
        Case(g, "no-arch", "fatq-train", ["--data-dir", "{data}", "--job-dir", "job"]),
        Case(g, "no-data-dir", "fatq-train", ["--arch", "resnet20", "--job-dir", "job"]),
        Case(g, "resume-without-job-dir", "fatq-train", ["--resume", "--data-dir", "{data}"]),
        Case(g, "eval-only-and-resume", "fatq-train", [*EVAL, "--resume", "--job-dir", "existing_dir"]),
        Case(g, "eval-only-bits-differ", "fatq-train", [*EVAL, "--bits", "8"]),
        Case(g, "eval-only-no-data-dir", "fatq-train", ["--eval-only", "{ckpt}"]),
        Case(g, "eval-only-public-without-arch", "fatq-train", ["--eval-only", "{fp32}", "--data-dir", "{data}"]),
        Case(g, "eval-only-arch-differs", "fatq-train", [*EVAL, "--arch", "resnet56"]),
    ]
    cases += [  # calibration flags given for a checkpoint that needs no calibration (int8 edge inputs)
        Case(g, f"unused-{name}", "fatq-export", [*EXPORT, *extra], "hand", note=UNUSED_CALIB)
        for name, extra in [
            ("calib-method-bogus", ["--calib-method", "bogus"]),
            ("calib-batches-0", ["--calib-batches", "0"]),
            ("calib-batches-negative", ["--calib-batches", "-1"]),
            ("calib-data-missing", ["--calib-data", "nope"]),
            ("calib-data-random-tar-gz", ["--calib-data", "{badtar}"]),
            ("calib-data-empty", ["--calib-data", "{empty_dir}"]),
        ]
    ]
    cases += _flag_cases(
        "fatq-export",
        EXPORT,
        [
            ("unknown-flag", ["--bogus-flag"]),
            ("format-bogus", ["--format", "onnx-int4"]),
            ("opset-abc", ["--opset", "abc"]),
            ("opset-5", ["--opset", "5"]),
            ("opset-99", ["--opset", "99"]),
            ("opset-2**70", ["--opset", SEED_2_70]),
            ("check-images-0", [*CHECK, "--check-images", "0"]),
            ("check-images-negative", [*CHECK, "--check-images", "-1"]),
            ("min-agreement-150", [*CHECK, "--min-agreement", "150"]),
            ("min-agreement-nan", [*CHECK, "--min-agreement", "nan"]),
            ("min-agreement-negative", [*CHECK, "--min-agreement", "-5"]),
            ("min-int8-identical-200", [*CHECK, "--min-int8-identical", "200"]),
            ("check-on-trt", ["--check", "--format", "trt"]),
        ],
    )
    cases += [
        Case(g, "no-checkpoint", "fatq-export", []),
        Case(g, "lint-and-checkpoint", "fatq-export", ["{ckpt}", "--lint", "{onnx}"]),
        Case(g, "lint-target-bogus", "fatq-export", ["--lint", "{onnx}", "--target", "tflite"]),
        Case(g, "lint-trt-version-9", "fatq-export", ["--lint", "{onnx}", "--trt-version", "9.0"]),
    ]
    cases += _flag_cases(
        "fatq-bench",
        BENCH,
        [
            ("unknown-flag", ["--bogus-flag"]),
            ("engine-bogus", ["--engine", "tflite"]),
            ("precision-int4", ["--precision", "int4"]),
            ("batch-sizes-0", ["--batch-sizes", "0"]),
            ("batch-sizes-abc", ["--batch-sizes", "abc"]),
            ("batch-sizes-empty", ["--batch-sizes", ""]),
            ("warmup-negative", ["--warmup", "-1"]),
            ("iterations-0", ["--iterations", "0"]),
            ("rounds-0", ["--rounds", "0"]),
            ("threads-0", ["--threads", "0"]),
            ("limit-0", ["--limit", "0"]),
            ("limit-negative", ["--limit", "-5"]),
            ("min-agreement-150", ["--reference", "{ref}", "--min-agreement", "150"]),
            ("min-agreement-nan", ["--reference", "{ref}", "--min-agreement", "nan"]),
            ("min-agreement-without-reference", ["--min-agreement", "99"]),
            (
                "max-accuracy-drop-negative",
                ["--reference", "{ref}", "--data-dir", "{data}", "--max-accuracy-drop", "-1"],
            ),
            ("max-accuracy-drop-without-data", ["--reference", "{ref}", "--max-accuracy-drop", "1"]),
            ("mean-std-lengths-differ", ["--mean", "0.5,0.5", "--std", "0.2,0.2,0.2"]),
            ("mean-without-std", ["--mean", "0.5,0.5,0.5"]),
            ("std-zero", ["--mean", "0.5,0.5,0.5", "--std", "0,0,0"]),
            ("mean-nan", ["--mean", "nan,0.5,0.5", "--std", "0.2,0.2,0.2"]),
            ("normalization-and-mean", ["--normalization", "cifar10", "--mean", "0.5,0.5,0.5", "--std", "1,1,1"]),
            ("normalization-bogus", ["--normalization", "mnist"]),
            ("dataset-bogus", ["--dataset", "mnist"]),
            ("trt-workspace-0", ["--trt-workspace-mib", "0"]),
            ("reference-mode-bogus", ["--reference", "{ref}", "--reference-mode", "exact"]),
            ("torch-mode-bogus", ["--torch-mode", "exact"]),
        ],
    )
    cases += _flag_cases(
        "fatq-bench",
        BENCH,
        [
            ("precision-bf16-on-ort", ["--engine", "ort", "--precision", "bf16"]),
            ("engine-torch-on-onnx", ["--engine", "torch"]),
        ],
        "hand",
    )
    cases.append(Case(g, "no-model", "fatq-bench", []))
    cases += _flag_cases(
        "fatq-ptq",
        PTQ,
        [
            ("unknown-flag", ["--bogus-flag"]),
            ("bits-32", ["--bits", "32"]),
            ("bits-1", ["--bits", "1"]),
            ("bits-9", ["--bits", "9"]),
            ("bits-abc", ["--bits", "abc"]),
            ("calib-method-bogus", ["--calib-method", "bogus"]),
            ("weight-method-bogus", ["--weight-method", "bogus"]),
            ("calib-batches-0", ["--calib-batches", "0"]),
            ("batch-size-negative", ["--batch-size", "-4"]),
            ("eval-batch-size-0", ["--eval-batch-size", "0"]),
            ("percentile-0", ["--calib-method", "percentile", "--percentile", "0"]),
            ("percentile-101", ["--calib-method", "percentile", "--percentile", "101"]),
            ("percentile-nan", ["--calib-method", "percentile", "--percentile", "nan"]),
            ("seed-2**70", ["--seed", SEED_2_70]),
            ("seed-negative", ["--seed", "-1"]),
            ("arch-bogus", ["--arch", "nosuchnet"]),
            ("arch-differs-from-weights", ["--arch", "resnet56"]),
            ("dataset-bogus", ["--dataset", "mnist"]),
        ],
    )
    cases += [
        Case(g, "no-bits", "fatq-ptq", ["{fp32}", "--arch", "resnet20", "--data-dir", "{data}", "-o", "out.pt"]),
        Case(g, "no-data-dir", "fatq-ptq", ["{fp32}", "--arch", "resnet20", "--bits", "8", "-o", "out.pt"]),
        Case(g, "public-without-arch", "fatq-ptq", ["{fp32}", "--bits", "8", "--data-dir", "{data}", "-o", "out.pt"]),
    ]
    cases += _flag_cases(
        "fatq-import",
        IMPORT,
        [
            ("unknown-flag", ["--bogus-flag"]),
            ("arch-bogus", ["--arch", "nosuchnet"]),
            ("bits-abc", ["--bits", "abc"]),
            ("bits-1", ["--bits", "1"]),
            ("bits-9", ["--bits", "9"]),
            ("shortcut-C", ["--shortcut", "C"]),
            ("arch-mobilenetv2", ["--arch", "mobilenetv2"]),
        ],
    )
    cases += [
        Case(g, "no-arch", "fatq-import", ["{fatref}", "--bits", "4", "-o", "out.pt"]),
        Case(g, "no-output", "fatq-import", ["{fatref}", "--arch", "resnet20", "--bits", "4"]),
    ]
    return cases


BAD_CHECKPOINTS = {
    "is-a-directory": "ckpt_dir",
    "missing": "ckpt_missing",
    "empty": "ckpt_empty",
    "random-bytes": "ckpt_random",
    "text-file": "ckpt_text",
    "state-dict-is-tensor": "ckpt_sd_tensor",
    "no-spec": "ckpt_no_spec",
    "arch-disagrees": "ckpt_arch_mismatch",
    "tensor-wrong-shape": "ckpt_wrong_shape",
    "foreign-pickle": "ckpt_pickle_object",
}
# consumers of a checkpoint: (name, cli, args with {X} for the checkpoint)
CHECKPOINT_CONSUMERS = [
    ("export", "fatq-export", ["{X}", "-o", "out.onnx"]),
    ("bench-model", "fatq-bench", ["{X}"]),
    ("bench-reference", "fatq-bench", [*BENCH, "--reference", "{X}"]),
    ("train-eval-only", "fatq-train", ["--eval-only", "{X}", "--data-dir", "{data}"]),
    ("train-pretrained", "fatq-train", swap(TRAIN, "--pretrained", "{X}")),
    ("ptq", "fatq-ptq", swap(PTQ, 0, "{X}")),
]
FATQ_ONLY = ("no-spec", "arch-disagrees", "tensor-wrong-shape")  # malformations of fatq's own format


def _substitute(args: list[str], fixture: str) -> list[str]:
    return [a.replace("{X}", "{" + fixture + "}") for a in args]


def checkpoint_cases() -> list[Case]:
    """Malformed checkpoints in every command that reads one, and --reference of another architecture."""
    cases = []
    for bad, fixture in BAD_CHECKPOINTS.items():
        for consumer, cli, args in CHECKPOINT_CONSUMERS:
            cases.append(Case("checkpoint", f"{consumer}-{bad}", cli, _substitute(args, fixture)))
        if bad not in FATQ_ONLY:
            cases.append(Case("checkpoint", f"import-{bad}", "fatq-import", swap(IMPORT, 0, "{" + fixture + "}")))
    g = "checkpoint"
    cases += [
        Case(g, "import-a-fatq-checkpoint", "fatq-import", swap(IMPORT, 0, "{ckpt}")),
        Case(g, "reference-public-resnet56", "fatq-bench", [*BENCH, "--reference", "{r56}"]),
        Case(g, "reference-fatq-resnet56", "fatq-bench", [*BENCH, "--reference", "{r56ckpt}"]),
        Case(g, "reference-resnet56-for-ckpt", "fatq-bench", ["{ckpt}", "--reference", "{r56ckpt}"]),
        Case(
            g,
            "reference-resnet56-deploy",
            "fatq-bench",
            [*BENCH, "--reference", "{r56ckpt}", "--reference-mode", "deploy"],
        ),
        Case(g, "reference-is-onnx", "fatq-bench", [*BENCH, "--reference", "{onnx}"]),
    ]
    return cases


BAD_ONNX = {
    "node-without-inputs": "onnx_no_inputs",
    "initializer-bytes-wrong": "onnx_bad_initializer",
    "unknown-op": "onnx_unknown_op",
    "random-bytes": "onnx_random",
    "empty": "onnx_empty",
    "text-file": "onnx_text",
    "is-a-directory": "onnx_dir",
    "missing": "onnx_missing",
}
ONNX_CONSUMERS = [
    ("lint", "fatq-export", ["--lint", "{X}"]),
    ("bench-ort", "fatq-bench", ["{X}"]),
    ("bench-openvino", "fatq-bench", ["{X}", "--engine", "openvino"]),
]


def onnx_cases() -> list[Case]:
    """Malformed ONNX files: --lint, fatq-bench on ONNX Runtime and on OpenVINO (a reason, not a cut-off line)."""
    cases = []
    for bad, fixture in BAD_ONNX.items():
        for consumer, cli, args in ONNX_CONSUMERS:
            group = "openvino" if consumer == "bench-openvino" else "onnx"
            # an unknown op is arguably a lint finding (exit 1) rather than bad input
            expect = "hand" if (consumer == "lint" and bad == "unknown-op") else "error"
            cases.append(Case(group, f"{consumer}-{bad}", cli, _substitute(args, fixture), expect))
    return cases


BAD_DATA = {
    "missing": "data_missing",
    "empty-dir": "empty_dir",
    "random-tar-gz": "badtar",
    "dir-with-random-tar-gz": "badtar_dir",
    "regular-file": "plain_file",
    "no-images": "no_images",
    "corrupt-jpeg": "corrupt_image",
    "3-classes": "three_class",
}
DATA_CONSUMERS = [
    ("train", "fatq-train", swap(TRAIN, "--data-dir", "{X}")),
    ("train-eval-only", "fatq-train", ["--eval-only", "{ckpt}", "--data-dir", "{X}"]),
    ("ptq", "fatq-ptq", swap(PTQ, "--data-dir", "{X}")),
    ("export-check", "fatq-export", [*EXPORT, *CHECK, "--data-dir", "{X}"]),
    ("bench", "fatq-bench", [*BENCH, "--data-dir", "{X}"]),
]


def data_cases() -> list[Case]:
    """Datasets that do not exist, cannot be read, or do not match the model."""
    cases = []
    for bad, fixture in BAD_DATA.items():
        for consumer, cli, args in DATA_CONSUMERS:
            cases.append(Case("data", f"{consumer}-{bad}", cli, _substitute(args, fixture)))
    # ten classes, other names: an error or at least a warning, never a silent 0 %
    g, other = "data", "{other_classes}"
    cases += [
        Case(
            g,
            "other-class-names-train-eval-only",
            "fatq-train",
            ["--eval-only", "{ckpt}", "--data-dir", other],
            "error-or-warning",
        ),
        Case(
            g,
            "other-class-names-train-pretrained-fatq",
            "fatq-train",
            swap(swap(TRAIN, "--pretrained", "{ckpt}"), "--data-dir", other),
            "error-or-warning",
        ),
        Case(
            g,
            "other-class-names-ptq-fatq-fp32",
            "fatq-ptq",
            ["{r56ckpt}", "--bits", "8", "--data-dir", other, "-o", "out.pt"],
            "error-or-warning",
        ),
        Case(
            g,
            "other-class-names-export-check",
            "fatq-export",
            [*EXPORT, *CHECK, "--data-dir", other],
            "error-or-warning",
        ),
        Case(
            g,
            "other-class-names-export-calib",
            "fatq-export",
            [*FEXPORT, "--calib-data", other],
            "hand",
            note="calibration reads only images",
        ),
        Case(g, "other-class-names-bench-onnx", "fatq-bench", [*BENCH, "--data-dir", other], "error-or-warning"),
        Case(g, "other-class-names-bench-ckpt", "fatq-bench", ["{ckpt}", "--data-dir", other], "error-or-warning"),
    ]
    return cases


def all_cases() -> list[Case]:
    cases = [
        *control_cases(),
        *output_path_cases(),
        *early_write_cases(),
        *argument_cases(),
        *checkpoint_cases(),
        *onnx_cases(),
        *data_cases(),
    ]
    ids = [c.id for c in cases]
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert not duplicates, f"duplicate case ids: {sorted(duplicates)}"
    return cases


# --- fixtures --------------------------------------------------------------------------------------


class HarnessError(Exception):
    """The sweep itself cannot run (missing tools or fixtures): exit 3, not a verdict on the commands."""


def _run_fixture_command(argv: list[str], env: dict) -> None:
    """Run one fixture-building command; HarnessError with its stderr when it fails."""
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise HarnessError(
            f"fixture command failed (exit {proc.returncode}): {shlex.join(argv)}\n{proc.stderr[-2000:]}"
        )


def _train_fixture(arch: str, bits: int, pretrained: Path, job_dir: Path, data: Path, env: dict, *extra: str) -> None:
    """One optimizer step of fatq-train from a public checkpoint: a real fatq checkpoint in seconds."""
    argv = ["fatq-train", "--arch", arch, "--bits", str(bits), *extra, "--pretrained", str(pretrained)]
    argv += ["--job-dir", str(job_dir), "--data-dir", str(data), "--max-steps", "1", "--batch-size", "16"]
    _run_fixture_command([*argv, "--device", "cpu", "--quiet"], env)


def _write_image_folder(root: Path, classes: list[str], seed: int, sizes: dict[str, int] | None = None) -> None:
    """``root/{train,test}/CLASS/NNNN.jpg``: random 32x32 RGB JPEGs (4 per class in train, 2 in test)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (sizes or {"train": 4, "test": 2}).items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=75)


def _dataset_paths(root: Path) -> dict[str, Path]:
    """Where :func:`_build_datasets` puts each dataset (``data`` is the good one)."""
    names = ("data", "other_classes", "three_class", "corrupt_image", "no_images", "empty_dir", "badtar_dir")
    paths = {name: root / name for name in names}
    paths.update(badtar=root / "random.tar.gz", plain_file=root / "plain.txt", data_missing=root / "no_such_data")
    return paths


def _build_datasets(root: Path) -> None:
    """The tiny CIFAR-10-named folder and the malformed / mismatched datasets."""
    p = _dataset_paths(root)
    cifar = list(CIFAR10_CLASSES)
    _write_image_folder(p["data"] / "cifar10-tiny", cifar, 0)
    _write_image_folder(p["other_classes"] / "shapes", [f"shape{i}" for i in range(10)], 1)
    _write_image_folder(p["three_class"] / "three", cifar[:3], 2)
    _write_image_folder(p["corrupt_image"] / "cifar10-corrupt", cifar, 3)
    _write_image_folder(p["no_images"] / "cifar10-empty", cifar, 4, {"train": 0, "test": 0})
    for split in ("train", "test"):
        (p["corrupt_image"] / "cifar10-corrupt" / split / "cat" / "0000.jpg").write_bytes(os.urandom(2048))
    p["empty_dir"].mkdir()
    p["badtar"].write_bytes(os.urandom(4096))
    p["badtar_dir"].mkdir()
    (p["badtar_dir"] / "cifar10-jpeg.tar.gz").write_bytes(os.urandom(4096))
    p["plain_file"].write_text("not a dataset\n")


def _build_bad_checkpoints(root: Path, ckpt: Path) -> None:
    """Checkpoints that are not one, or a fatq checkpoint with one thing wrong (names: BAD_CHECKPOINTS)."""
    import torch

    p = {name: root / f"{name}.pt" for name in BAD_CHECKPOINTS.values()}
    p["ckpt_dir"].mkdir()
    p["ckpt_empty"].write_bytes(b"")
    p["ckpt_random"].write_bytes(os.urandom(65536))
    p["ckpt_text"].write_text("this is a text file, not a checkpoint\n")
    torch.save({"state_dict": torch.zeros(3)}, p["ckpt_sd_tensor"])
    good = torch.load(ckpt, map_location="cpu", weights_only=False)
    torch.save({k: v for k, v in good.items() if k != "spec"}, p["ckpt_no_spec"])
    torch.save({**good, "arch": "resnet56"}, p["ckpt_arch_mismatch"])  # resnet20 weights
    state = dict(good["state_dict"])
    key = next(k for k, v in state.items() if k.endswith("weight") and v.dim() == 4)
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    torch.save({**good, "state_dict": state}, p["ckpt_wrong_shape"])
    # an object weights_only loading refuses
    torch.save({"state_dict": good["state_dict"], "args": argparse.Namespace(lr=0.1)}, p["ckpt_pickle_object"])


def _build_bad_onnx(root: Path, onnx_path: Path) -> None:
    """ONNX files with one defect each (written without onnx's checker), and non-ONNX files named .onnx."""
    import onnx

    p = {name: root / f"{name}.onnx" for name in BAD_ONNX.values()}
    model = onnx.load(onnx_path)
    node = next(n for n in model.graph.node if n.op_type == "Conv")
    del node.input[:]
    onnx.save(model, p["onnx_no_inputs"])

    model = onnx.load(onnx_path)
    init = max((i for i in model.graph.initializer if i.raw_data), key=lambda i: len(i.raw_data))
    init.raw_data = init.raw_data[: len(init.raw_data) // 2]  # dims unchanged: half the bytes they need
    onnx.save(model, p["onnx_bad_initializer"])

    model = onnx.load(onnx_path)
    node = next(n for n in model.graph.node if n.op_type == "Conv")
    node.op_type = "FatqNoSuchOp"
    onnx.save(model, p["onnx_unknown_op"])

    p["onnx_random"].write_bytes(os.urandom(65536))
    p["onnx_empty"].write_bytes(b"")
    p["onnx_text"].write_text("this is a text file, not an ONNX model\n")
    p["onnx_dir"].mkdir()


def _fixture_paths(root: Path, pretrained_dir: Path) -> dict[str, Path]:
    """Every fixture's path by the name the case table uses (``{name}``)."""
    paths = {
        "fp32": pretrained_dir / "resnet20-cifar10-fp32.th",
        "r56": pretrained_dir / "resnet56-cifar10-fp32.th",
        "fatref": pretrained_dir / "fat-reference" / "resnet_20_4bit.pth.tar",
        "job": root / "job",  # the W4A4 ResNet-20 run
        "ckpt": root / "job" / "best.pt",
        "onnx": root / "m.onnx",
        "ref": root / "m.reference.pt",
        "fckpt": root / "jobf" / "best.pt",  # W4A4 ResNet-20 with float edge inputs
        "r56ckpt": root / "job56" / "best.pt",  # FP32 ResNet-56
        **_dataset_paths(root / "datasets"),
    }
    paths.update({n: root / "bad_checkpoints" / f"{n}.pt" for n in BAD_CHECKPOINTS.values()})
    paths.update({n: root / "bad_onnx" / f"{n}.onnx" for n in BAD_ONNX.values()})
    return paths


def build_fixtures(root: Path, pretrained_dir: Path, env: dict, real_data: Path | None) -> dict[str, str]:
    """Build (or reuse, when ``root/.complete`` matches) every fixture; returns {name: path}."""
    p = _fixture_paths(root, pretrained_dir)
    for name in ("fp32", "r56", "fatref"):
        if not p[name].is_file():
            raise HarnessError(f"{p[name]} does not exist (set --pretrained-dir or FATQ_PRETRAINED_DIR).")
    marker = root / ".complete"
    stamp = f"{FIXTURE_VERSION}|{real_data}|{pretrained_dir}"
    if marker.exists() and marker.read_text() == stamp:
        print(f"reusing fixtures in {root}", flush=True)
        return {name: str(path) for name, path in p.items()}
    print(f"building fixtures in {root} ...", flush=True)
    started = time.monotonic()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    _build_datasets(root / "datasets")
    data = real_data or p["data"]
    _train_fixture("resnet20", 4, p["fp32"], p["job"], data, env)
    _run_fixture_command(["fatq-export", str(p["ckpt"]), "--format", "onnx", "-o", str(p["onnx"]), "--quiet"], env)
    _train_fixture("resnet20", 4, p["fp32"], p["fckpt"].parent, data, env, "--edge-inputs", "float")
    _train_fixture("resnet56", 32, p["r56"], p["r56ckpt"].parent, data, env)
    (root / "bad_checkpoints").mkdir()
    _build_bad_checkpoints(root / "bad_checkpoints", p["ckpt"])
    (root / "bad_onnx").mkdir()
    _build_bad_onnx(root / "bad_onnx", p["onnx"])
    marker.write_text(stamp)
    print(f"fixtures built in {time.monotonic() - started:.0f} s", flush=True)
    return {name: str(path) for name, path in p.items()}


def chattr_works() -> bool:
    """Whether ``chattr +i`` makes a directory unwritable here (as root, chmod would not)."""
    probe = Path(tempfile.mkdtemp(prefix="sweep-chattr-"))
    try:
        if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
            return False
        try:
            (probe / "x").write_text("x")
            return False
        except OSError:
            return True
    except FileNotFoundError:  # no chattr binary
        return False
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        shutil.rmtree(probe, ignore_errors=True)


# --- running and judging a case --------------------------------------------------------------------


@dataclass
class Result:
    id: str
    group: str
    cli: str
    command: str
    cwd: str
    expect: str
    verdict: str
    reason: str
    returncode: int | None
    stderr: str
    stdout_tail: str
    seconds: float
    leftovers: list[str] = field(default_factory=list)
    note: str = ""


def snapshot(roots: list[Path], exclude: Path | None) -> dict[str, tuple]:
    """{path: (kind, size, mtime_ns)} of everything under ``roots`` (directories by existence only)."""
    entries = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if exclude is not None and (here == exclude or exclude in here.parents):
                dirnames[:] = []
                continue
            for d in dirnames:
                entries[str(here / d)] = ("dir", 0, 0)
            for f in filenames:
                try:
                    st = (here / f).lstat()
                except FileNotFoundError:
                    continue
                entries[str(here / f)] = ("file", st.st_size, st.st_mtime_ns)
    return entries


def file_changes(before: dict, after: dict) -> list[str]:
    """What a command left: new, removed and modified paths."""
    new = [f"new {p}" for p in sorted(after.keys() - before.keys())]
    gone = [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    changed = [f"modified {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return new + gone + changed


def prepare_cwd(cwd: Path, case: Case, fixtures: dict[str, str], can_chattr: bool) -> str | None:
    """Create the standard files and the case's setup in ``cwd``; returns a skip reason or None."""
    (cwd / "somefile").write_text("a regular file\n")
    (cwd / "existing_dir").mkdir()
    for step in case.setup:
        if step == "immutable":
            if not can_chattr:
                return "chattr +i does not work here (no chattr, or a file system without the attribute)"
            (cwd / "ro").mkdir()
            subprocess.run(["chattr", "+i", str(cwd / "ro")], check=True, capture_output=True)
        elif step.startswith("copy:"):
            _, name, target = step.split(":")
            source = Path(fixtures[name])
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, cwd / target)
        elif step.startswith("mkdir:"):
            (cwd / step.split(":", 1)[1]).mkdir()
        else:
            raise ValueError(f"unknown setup step {step!r} in {case.id}")
    return None


def release_cwd(cwd: Path, keep: bool) -> None:
    """Undo chattr +i (always), then delete the working directory unless kept."""
    if (cwd / "ro").exists():
        subprocess.run(["chattr", "-i", str(cwd / "ro")], capture_output=True)
    if not keep:
        shutil.rmtree(cwd, ignore_errors=True)


def run_command(argv: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int | None, str, str, float]:
    """(exit status or None on timeout, stdout, stderr, seconds); a timed-out command's group is killed."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    return rc, out, err, time.monotonic() - started


SENTENCE_END = (".", "!", "?", ")", '"', "'")


def stderr_problems(stderr: str, cli: str) -> list[str]:
    """Ways stderr differs from one clear sentence."""
    problems = []
    lines = [line for line in stderr.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in stderr:
        problems.append("Python traceback on stderr")
    if any(line.lstrip().startswith("usage:") for line in lines):
        problems.append("usage dump on stderr")
    if not lines:
        return [*problems, "nothing on stderr"]
    if len(lines) > 1:
        problems.append(f"{len(lines)} lines on stderr, not one")
    if problems:  # a traceback or usage dump: its last line is no sentence to judge
        return problems
    error_lines = [line for line in lines if f"{cli}: error:" in line] or lines[:1]
    message = error_lines[-1].split("error:", 1)[-1].strip()
    if not message:
        problems.append("empty error message")
    elif re.search(r":\s*\.?$", message) or not message.endswith(SENTENCE_END):
        problems.append(f"message looks cut off (ends {message[-24:]!r})")
    return problems


def has_warning(text: str) -> bool:
    return re.search(r"\bwarn(ing)?\b", text, re.IGNORECASE) is not None


def judge(case: Case, rc: int | None, stdout: str, stderr: str, changes: list[str]) -> tuple[str, str]:
    """(verdict, reason) of one case's outcome."""
    if rc is None:
        return "FAIL", "timed out"
    if rc < 0:
        return "FAIL", f"killed by {signal.Signals(-rc).name}" + ("; nothing on stderr" if not stderr.strip() else "")
    if case.expect == "ok":
        return ("PASS", "exit 0") if rc == 0 else ("FAIL", f"control exited {rc} (fixture or harness problem?)")
    problems = stderr_problems(stderr, case.cli)
    refused = rc == 2
    if refused and not problems and not changes:
        return "PASS", "exit 2, one sentence, nothing written"
    if refused or case.expect == "error":
        reasons = ([] if refused else [f"exit {rc}, expected 2"]) + problems + changes[:6]
        if len(changes) > 6:
            reasons.append(f"... {len(changes) - 6} more paths")
        return "FAIL", "; ".join(reasons)
    # judgement calls: the command did not refuse
    if "Python traceback on stderr" in problems:
        return "FAIL", f"exit {rc} with a traceback"
    warned = has_warning(stderr) or has_warning(stdout)
    if case.expect == "error-or-warning" and rc == 0 and not warned:
        return "FAIL", "exit 0 without a warning (silent result on mismatched data)"
    what = "with a warning" if warned else "without a warning"
    return "HAND", f"check by hand: exit {rc} {what}" + (f" ({case.note})" if case.note else "")


def run_case(case: Case, fixtures: dict[str, str], env: dict, opts: argparse.Namespace, can_chattr: bool) -> Result:
    cwd = Path(tempfile.mkdtemp(prefix="sweep-case-"))
    argv = [case.cli, *(LIGHT[case.cli] if case.light else []), *(a.format(**fixtures) for a in case.args)]
    command = shlex.join(argv)
    try:
        skip = prepare_cwd(cwd, case, fixtures, can_chattr)
        if skip:
            return Result(
                case.id,
                case.group,
                case.cli,
                command,
                str(cwd),
                case.expect,
                "SKIP",
                skip,
                None,
                "",
                "",
                0.0,
                note=case.note,
            )
        roots = [cwd, Path(fixtures["job"]).parent]
        before = snapshot(roots, opts.cache_dir)
        rc, out, err, seconds = run_command(argv, cwd, env, opts.timeout)
        changes = file_changes(before, snapshot(roots, opts.cache_dir))
        verdict, reason = judge(case, rc, out, err, changes)
        leftovers = [c.replace(str(cwd) + "/", "") for c in changes]
        return Result(
            case.id,
            case.group,
            case.cli,
            command,
            str(cwd),
            case.expect,
            verdict,
            reason,
            rc,
            err,
            out[-2000:],
            round(seconds, 1),
            leftovers,
            case.note,
        )
    finally:
        release_cwd(cwd, opts.keep)


# --- report ---------------------------------------------------------------------------------------


def one_line(result: Result) -> str:
    stderr = result.stderr.strip().replace("\n", " \\n ")[:200]
    rc = "-" if result.returncode is None else result.returncode
    return f"{result.verdict:<4} {result.id:<58} rc={rc:<3} {result.seconds:5.1f}s  {result.reason} | {stderr}"


def summary(results: list[Result], seconds: float) -> dict:
    counts = {v: sum(r.verdict == v for r in results) for v in ("PASS", "FAIL", "HAND", "SKIP")}
    groups: dict[str, dict[str, int]] = {}
    for r in results:
        groups.setdefault(r.group, {}).setdefault(r.verdict, 0)
        groups[r.group][r.verdict] += 1
    return {"cases": len(results), **counts, "by_group": groups, "seconds": round(seconds, 1)}


def print_summary(results: list[Result], seconds: float) -> None:
    s = summary(results, seconds)
    print(
        f"\n{s['cases']} cases: {s['PASS']} PASS, {s['FAIL']} FAIL, {s['HAND']} check by hand, {s['SKIP']} skipped "
        f"in {seconds:.0f} s"
    )
    for group, counts in s["by_group"].items():
        print(f"  {group:<12} " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))
    for verdict in ("FAIL", "HAND", "SKIP"):
        chosen = [r for r in results if r.verdict == verdict]
        if chosen:
            print(f"\n{verdict}:")
            for r in chosen:
                print(
                    f"  {r.id}: {r.reason}\n    $ {r.command}" + (f"\n    (cwd {r.cwd})" if verdict == "FAIL" else "")
                )


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write every case's result here")
    p.add_argument(
        "--pretrained-dir",
        type=Path,
        default=os.environ.get("FATQ_PRETRAINED_DIR"),
        help="public checkpoints (default $FATQ_PRETRAINED_DIR)",
    )
    p.add_argument(
        "--fixture-data",
        choices=("tiny", "real"),
        default="tiny",
        help="train the fixture checkpoint on a tiny synthetic folder (default) or on $FATQ_DATA_DIR",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("FATQ_DATA_DIR"),
        help="real dataset for --fixture-data real (default $FATQ_DATA_DIR)",
    )
    p.add_argument(
        "--fixtures", type=Path, help="build the fixtures here and reuse them next time (default: a temp dir)"
    )
    p.add_argument("--only", help="run only cases whose id matches this regular expression")
    p.add_argument("--keep", action="store_true", help="keep every case's working directory")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help=f"seconds per case (default {TIMEOUT_S})")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p.parse_args(argv)


def command_environment(opts: argparse.Namespace) -> dict:
    """The commands' environment; HarnessError when the sweep cannot run here."""
    missing = [c for c in CLIS if shutil.which(c) is None]
    if missing:
        raise HarnessError(f"not on PATH: {', '.join(missing)} (pip install -e . first).")
    if opts.pretrained_dir is None:
        raise HarnessError("give --pretrained-dir or set FATQ_PRETRAINED_DIR.")
    if opts.fixture_data == "real" and opts.data_dir is None:
        raise HarnessError("--fixture-data real needs --data-dir or FATQ_DATA_DIR.")
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # bad input needs no parallelism; keep the machine free
        env.setdefault(var, "1")
    return env


def run_sweep(cases: list[Case], opts: argparse.Namespace, env: dict, fixture_root: Path) -> list[Result]:
    """Build the fixtures, run every case and print its line."""
    real_data = opts.data_dir.resolve() if opts.fixture_data == "real" else None
    fixtures = build_fixtures(fixture_root, opts.pretrained_dir.resolve(), env, real_data)
    can_chattr = chattr_works()
    if not can_chattr:
        print("note: chattr +i does not work here; the immutable-directory cases are skipped", flush=True)
    results = []
    for case in cases:
        results.append(run_case(case, fixtures, env, opts, can_chattr))
        print(one_line(results[-1]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    cases = [c for c in all_cases() if not opts.only or re.search(opts.only, c.id)]
    if opts.list:
        for c in cases:
            print(f"{c.id:<58} {c.expect:<16} {c.cli} {shlex.join(c.args)}")
        print(f"{len(cases)} cases")
        return 0
    started = time.monotonic()
    fixture_root = opts.fixtures.resolve() if opts.fixtures else Path(tempfile.mkdtemp(prefix="sweep-fixtures-"))
    try:
        env = command_environment(opts)
        # absolute: each case runs in its own directory, where a relative cache path would point elsewhere
        opts.cache_dir = Path(env.get("FATQ_CACHE_DIR", Path.home() / ".cache" / "fatq")).resolve()
        env["FATQ_CACHE_DIR"] = str(opts.cache_dir)
        results = run_sweep(cases, opts, env, fixture_root)
    except HarnessError as exc:
        print(f"bad_input_sweep: {exc}", file=sys.stderr)
        return 3
    finally:
        if opts.fixtures is None and not opts.keep:
            shutil.rmtree(fixture_root, ignore_errors=True)
    seconds = time.monotonic() - started
    print_summary(results, seconds)
    if opts.json:
        report = {"summary": summary(results, seconds), "cases": [asdict(r) for r in results]}
        opts.json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {opts.json}")
    return 1 if any(r.verdict == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
