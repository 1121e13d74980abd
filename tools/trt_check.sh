#!/usr/bin/env bash
# TensorRT check in one shot, for a machine with a CUDA GPU, TensorRT's trtexec and the tensorrt and
# cuda-python wheels. NOT RUN YET: it was written where there is neither a GPU nor TensorRT (no machine
# of this project has both), so nothing below has been verified; the first run on such a machine is the
# test. Every step is recorded, and a failing step does not stop the later ones.
#
#   tools/trt_check.sh CKPT [DATA_DIR]
#
# CKPT: the demo model (tools/demo.sh writes runs/demo/train/best.pt). DATA_DIR (or FATQ_DATA_DIR): the
# CIFAR-10 directory for the parity gate on the test split; without it fatq-bench uses 256 random inputs.
# Environment: TRTEXEC (default: trtexec on PATH), FATQ_TRT_FORMAT (default onnx: the export format of
# the TensorRT file), FATQ_TRT_MIN_AGREEMENT (default 99.9), OUT (results folder, default ./trt_check_out).
# Steps, each with its exit status and seconds in trt_check.json:
#   1. export the TensorRT file at opset 20 (+ its .reference.pt, the model the file computes);
#   2. the TensorRT lint of export/lint_rules.py (rules from onnx-tensorrt's parser source and docs);
#   3. trtexec --stronglyTyped (omitted on 11.x, where every network is strongly typed): build, then time
#      at the largest batch with CUDA graphs and no host<->device copies (engine-only GPU compute time);
#   4. the Python builder (engines.trt_builder.build_plan_from_onnx: lint, then a strongly typed build);
#   5. fatq-bench on that plan: the parity gate against .reference.pt and latency at batch 1 and 64.
set -uo pipefail

CKPT=${1:-}
DATA_DIR=${2:-${FATQ_DATA_DIR:-}}
if [[ -z "$CKPT" || ! -f "$CKPT" ]]; then
    echo "usage: $0 CKPT [DATA_DIR]  (CKPT must be a fatq checkpoint file)" >&2
    exit 2
fi
if [[ -n "$DATA_DIR" && ! -e "$DATA_DIR" ]]; then
    echo "$0: data directory $DATA_DIR does not exist." >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=${OUT:-$PWD/trt_check_out}
TRTEXEC=${TRTEXEC:-trtexec}
FORMAT=${FATQ_TRT_FORMAT:-onnx}
MIN_AGREEMENT=${FATQ_TRT_MIN_AGREEMENT:-99.9}
mkdir -p "$RESULTS"
CKPT=$(cd "$(dirname "$CKPT")" && pwd)/$(basename "$CKPT")
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export FATQ_CACHE_DIR=${FATQ_CACHE_DIR:-${TMPDIR:-/tmp}/fatq-cache}  # timing caches stay out of $RESULTS
mkdir -p "$FATQ_CACHE_DIR"
cd "$REPO" || exit 2

for tool in nvidia-smi "$TRTEXEC"; do
    command -v "$tool" >/dev/null || { echo "$0: $tool not found; this check needs a CUDA GPU and TensorRT." >&2; exit 2; }
done
TRT_VERSION=$(python -c "import tensorrt; print(tensorrt.__version__)" 2>/dev/null) ||
    { echo "$0: the tensorrt Python package is not importable (pip install 'fatq[trt]')." >&2; exit 2; }
python -c "import cuda.bindings.runtime" 2>/dev/null ||
    { echo "$0: cuda-python is not importable (pip install 'fatq[trt]')." >&2; exit 2; }

STEPS="$RESULTS/steps.tsv"
: >"$STEPS"
# run_step NAME LOG COMMAND...: run COMMAND with its output in LOG; record NAME, exit status, seconds
run_step() {
    local name=$1 log=$2 start end rc
    shift 2
    echo "== $name" >&2
    start=$(date +%s.%N)
    "$@" >"$log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(python -c "print(round($end - $start, 2))")" "$log" >>"$STEPS"
    tail -n 5 "$log" >&2
    return 0
}

MODEL="$RESULTS/model.onnx"
run_step export "$RESULTS/export.log" \
    python -m export.cli "$CKPT" --format "$FORMAT" --opset 20 -o "$MODEL" --quiet
run_step lint "$RESULTS/lint.txt" python -c '
import sys
from export.lint_rules import DEFAULT_TRT_VERSION, main_lint, trt_version_info
from fatq.errors import FatqError
version = sys.argv[2]
try:
    trt_version_info(version)
except FatqError:  # a release line whose opset range is not recorded here: check the oldest recorded one
    version = DEFAULT_TRT_VERSION
sys.exit(main_lint(sys.argv[1], "trt", version))
' "$MODEL" "$TRT_VERSION"

# trtexec shapes from the file's input: [batch, C, H, W] with a dynamic batch
SHAPE=$(python -c "import onnx, sys
m = onnx.load(sys.argv[1], load_external_data=False)
print('x'.join(str(d.dim_value) for d in m.graph.input[0].type.tensor_type.shape.dim[1:]))" "$MODEL" 2>/dev/null ||
    echo 3x32x32)
INPUT=$(python -c "import onnx, sys; print(onnx.load(sys.argv[1], load_external_data=False).graph.input[0].name)" \
    "$MODEL" 2>/dev/null || echo input)
TYPED=(--stronglyTyped)
if [[ ${TRT_VERSION%%.*} -ge 11 ]]; then TYPED=(); fi  # 11.x: always strongly typed, the flag is gone
run_step trtexec_build "$RESULTS/trtexec_build.log" "$TRTEXEC" --onnx="$MODEL" ${TYPED[@]+"${TYPED[@]}"} \
    --minShapes="$INPUT:1x$SHAPE" --optShapes="$INPUT:64x$SHAPE" --maxShapes="$INPUT:64x$SHAPE" \
    --saveEngine="$RESULTS/trtexec.plan" --skipInference
run_step trtexec_time "$RESULTS/trtexec_time.log" "$TRTEXEC" --loadEngine="$RESULTS/trtexec.plan" \
    --shapes="$INPUT:64x$SHAPE" --warmUp=500 --duration=10 --useCudaGraph --noDataTransfers

run_step python_build "$RESULTS/python_build.log" python -c '
import json, sys
from engines.trt_builder import BuildSettings, build_plan_from_onnx
from fatq.errors import FatqError
try:
    sidecar = build_plan_from_onnx(sys.argv[1], sys.argv[2], BuildSettings("int8", opt_batch=64, max_batch=64))
except FatqError as exc:
    sys.exit(f"refused: {exc}")
print(json.dumps(sidecar, indent=2))
' "$MODEL" "$RESULTS/fatq.plan"

DATA=()
if [[ -n "$DATA_DIR" ]]; then DATA=(--data-dir "$DATA_DIR"); fi
run_step parity "$RESULTS/parity.log" python -m engines.cli "$RESULTS/fatq.plan" --engine trt \
    --reference "${MODEL%.onnx}.reference.pt" --min-agreement "$MIN_AGREEMENT" --batch-sizes 1,64 \
    --warmup 20 --iterations 200 ${DATA[@]+"${DATA[@]}"} --json "$RESULTS/bench.json" --quiet

python - "$RESULTS" "$CKPT" "$TRT_VERSION" "$FORMAT" <<'EOF'
import datetime, json, re, subprocess, sys
from pathlib import Path

results, ckpt, trt_version, fmt = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
steps = {}
for line in (results / "steps.tsv").read_text().splitlines():
    name, rc, seconds, log = line.split("\t")
    steps[name] = {"exit_status": int(rc), "seconds": float(seconds), "log": Path(log).name}


def trtexec_stats(log: Path) -> dict:
    """trtexec's summary lines: throughput (qps) and GPU compute time (ms) min/mean/median/percentiles."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    stats = {}
    if m := re.search(r"Throughput: ([\d.]+) qps", text):
        stats["throughput_qps"] = float(m.group(1))
    if m := re.search(r"GPU Compute Time: (.*)", text):
        stats["gpu_compute_ms"] = {k.strip(): float(v) for k, v in re.findall(r"([\w()%. ]+) = ([\d.]+) ms", m.group(1))}
    return stats


steps["trtexec_time"].update(trtexec_stats(results / "trtexec_time.log"))
sidecar = results / "fatq.plan.json"
if sidecar.is_file():
    steps["python_build"]["sidecar"] = json.loads(sidecar.read_text())
bench = results / "bench.json"
if bench.is_file():
    report = json.loads(bench.read_text())
    keys = ("label", "batch_size", "latency_ms", "latency_source", "transfer_ms", "throughput_ips")
    steps["parity"]["runs"] = [{k: r.get(k) for k in keys} for r in report.get("runs", [])]
    for key in ("agreement", "accuracy", "gate", "eval_inputs"):
        steps["parity"][key] = report.get(key, report.get("settings", {}).get(key))
try:
    gpu = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
except OSError as exc:
    gpu = f"nvidia-smi failed: {exc}"
summary = {
    "tool": "tools/trt_check.sh",
    "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "checkpoint": ckpt,
    "format": fmt,
    "tensorrt_version": trt_version,
    "gpu": gpu,
    "all_passed": all(s["exit_status"] == 0 for s in steps.values()),
    "steps": steps,
}
(results / "trt_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({name: s["exit_status"] for name, s in steps.items()}))
sys.exit(0 if summary["all_passed"] else 1)
EOF
