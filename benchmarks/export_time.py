"""How long ``fatq-export`` takes, stage by stage (target: ResNet-56 W4A4 under 5 s).

Times, for one checkpoint (default: a random ResNet-56 W4A4 saved to a temp dir), the stages of
``fatq-export --format onnx`` in this process: load + rebuild the model, fold (which computes the
FAT transform and integers of every layer), lower, make the model engine-exact
(:mod:`export.engine_exact`, which folds and lowers again after each change), write the QDQ ONNX,
lint it, save the file and its deploy graph; also the ``--format onnx-ort`` writer (with its
QLinearAdd exactness check, one ONNX Runtime session). Then the commands themselves as
subprocesses, for both int8 formats: the time each reports (checkpoint to files written, what the
< 5 s target is about) and its wall time including interpreter start and imports (torch, onnx).
Prints the median of ``--repeats`` runs per line.

Usage::

    python benchmarks/export_time.py                      # random ResNet-56 W4A4
    python benchmarks/export_time.py --checkpoint runs/r56/last.pt --repeats 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _stages(checkpoint: Path, out: Path) -> dict[str, float]:
    import onnx

    from export.engine_exact import make_engine_exact
    from export.fold import fold
    from export.formats import DEPLOY_GRAPH, companion_path
    from export.lint_rules import assert_clean
    from export.lower import lower
    from export.ort_writer import write_ort
    from export.pipeline import deploy_graph
    from export.qdq_writer import write_qdq
    from fatq.checkpoint import load_fatq_checkpoint, model_from_checkpoint

    times = {}
    start = time.perf_counter()
    data = load_fatq_checkpoint(checkpoint)
    model = model_from_checkpoint(data).eval()
    times["load checkpoint + build model"] = time.perf_counter() - start
    mark = time.perf_counter()
    folded = fold(model, list(data["input_size"]))
    times["fold (FAT transform, integers, BN)"] = time.perf_counter() - mark
    mark = time.perf_counter()
    graph = lower(folded)
    times["lower to integer ops"] = time.perf_counter() - mark
    mark = time.perf_counter()
    input_size = list(data["input_size"])
    graph, _ = make_engine_exact(model, lambda m: deploy_graph(m, input_size), graph=graph)
    times["engine-exact model (ties, biases)"] = time.perf_counter() - mark
    mark = time.perf_counter()
    onnx_model = write_qdq(graph, metadata=graph.meta)
    times["write QDQ ONNX"] = time.perf_counter() - mark
    mark = time.perf_counter()
    assert_clean(onnx_model, "trt")
    times["lint"] = time.perf_counter() - mark
    mark = time.perf_counter()
    onnx.save(onnx_model, str(out))
    graph.save(companion_path(out, DEPLOY_GRAPH))
    times["save files"] = time.perf_counter() - mark
    times["total in process"] = time.perf_counter() - start
    mark = time.perf_counter()
    write_ort(graph, metadata=graph.meta)
    times["write onnx-ort (QLinearAdd check incl.)"] = time.perf_counter() - mark
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="fatq checkpoint (default: random --arch at --bits)")
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from fatq.checkpoint import CIFAR_NORMALIZATION, save_checkpoint
    from fatq.models import create_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else work / f"{args.arch}.pt"
        if not args.checkpoint:
            save_checkpoint(checkpoint, create_model(args.arch, bits=args.bits).eval(), CIFAR_NORMALIZATION)
        runs = [_stages(checkpoint, work / "m.onnx") for _ in range(args.repeats)]
        walls, reported = {}, {}
        for fmt in ("onnx", "onnx-ort"):
            command = [shutil.which("fatq-export") or "fatq-export", str(checkpoint), "--format", fmt]
            command += ["-o", str(work / f"cli-{fmt}.onnx"), "--quiet"]
            walls[fmt], reported[fmt] = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                walls[fmt].append(time.perf_counter() - start)
                # "wrote PATH (N KiB, M nodes) in X s": the command's own timing, after imports
                reported[fmt].append(float(output.rsplit(" in ", 1)[1].split()[0]))

    print(
        f"{checkpoint.name}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"python {sys.version.split()[0]}"
    )
    for stage in runs[0]:
        print(f"  {stage:<46} {statistics.median(r[stage] for r in runs):7.3f} s")
    for fmt in walls:
        print(f"  {'fatq-export --format ' + fmt + ', as it reports':<46} {statistics.median(reported[fmt]):7.3f} s")
        print(f"  {'  the same command (wall, with imports)':<46} {statistics.median(walls[fmt]):7.3f} s")


if __name__ == "__main__":
    main()
