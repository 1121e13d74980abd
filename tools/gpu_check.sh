#!/usr/bin/env bash
# GPU check of the training path, for a lent CUDA machine (prepared for an H200; not run yet:
# the session that wrote it had no GPU, so nothing in it has been verified on CUDA).
#
#   tools/gpu_check.sh DATA_DIR [PRETRAINED] [STEPS]
#
# DATA_DIR: directory holding cifar10-jpeg.tar.gz (or the extracted ImageFolder tree), carried
# to the machine with the repo; PRETRAINED: optional public FP32 resnet20 checkpoint; STEPS:
# training steps per run (default 300). Needs PyTorch with CUDA plus numpy, pillow and tqdm; no
# network. Results go to $OUT (if set) or ./gpu_check_out:
#   1. fatq-train ResNet-20 W4A4 on CUDA for STEPS steps, without and with --amp: images/s,
#      wall time, final top-1 (train_fp32.json, train_amp.json, *.log);
#   2. benchmarks/train_step.py --device cuda (FAT vs no-transform vs FP32 step, with/without amp);
#   3. CUDA latency of the fake-quant W4A4 model in eval mode, fp32 vs fp16 autocast, batch 1 and
#      256 (latency.json).
set -euo pipefail

DATA_DIR=${1:-${FATQ_DATA_DIR:-}}
PRETRAINED=${2:-}
STEPS=${3:-300}
if [[ -z "$DATA_DIR" || ! -e "$DATA_DIR" ]]; then
    echo "usage: $0 DATA_DIR [PRETRAINED] [STEPS]  (DATA_DIR must exist)" >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=${OUT:-$PWD/gpu_check_out}
mkdir -p "$RESULTS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export FATQ_CACHE_DIR=${FATQ_CACHE_DIR:-${TMPDIR:-/tmp}/fatq-cache}  # decoded data stays out of $OUT
mkdir -p "$FATQ_CACHE_DIR"
cd "$REPO"

echo "== environment" | tee "$RESULTS/summary.txt"
python - <<'EOF' | tee -a "$RESULTS/summary.txt"
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to PyTorch")
print("gpu", torch.cuda.get_device_name(0), "count", torch.cuda.device_count())
missing = [m for m in ("numpy", "PIL", "tqdm") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {missing}")
EOF

INIT=()
if [[ -n "$PRETRAINED" ]]; then INIT=(--pretrained "$PRETRAINED"); fi
for mode in fp32 amp; do
    AMP=()
    if [[ $mode == amp ]]; then AMP=(--amp); fi
    echo "== train W4A4, $STEPS steps, $mode" | tee -a "$RESULTS/summary.txt"
    start=$(date +%s.%N)
    python -m fatq.cli_train --arch resnet20 --bits 4 --dataset cifar10 --data-dir "$DATA_DIR" ${INIT[@]+"${INIT[@]}"} \
        --epochs 2 --max-steps "$STEPS" --device cuda ${AMP[@]+"${AMP[@]}"} --quiet \
        --job-dir "$RESULTS/job_$mode" --json "$RESULTS/train_$mode.json" 2>&1 | tee "$RESULTS/train_$mode.log"
    end=$(date +%s.%N)
    python - "$RESULTS/train_$mode.json" "$RESULTS/job_$mode/metrics.jsonl" "$start" "$end" <<'EOF' | tee -a "$RESULTS/summary.txt"
import json, sys
summary = json.load(open(sys.argv[1]))
records = [json.loads(line) for line in open(sys.argv[2])]
images = sum(r.get("train_images", 0) for r in records)
seconds = sum(r.get("train_seconds", 0.0) for r in records)
print(f"steps {summary['steps']}  top-1 {summary['top1']:.2f} %  train {images / seconds:.0f} images/s "
      f"(training loop only)  wall {float(sys.argv[4]) - float(sys.argv[3]):.0f} s (incl. data, eval, start)")
EOF
    rm -f "$RESULTS/job_$mode/"*.pt  # checkpoints are not needed back
done

echo "== benchmarks/train_step.py" | tee -a "$RESULTS/summary.txt"
python benchmarks/train_step.py --device cuda --steps 30 --warmup 5 --json "$RESULTS/train_step.json" \
    | tee -a "$RESULTS/summary.txt"
python benchmarks/train_step.py --device cuda --steps 30 --warmup 5 --amp --json "$RESULTS/train_step_amp.json" \
    | tee -a "$RESULTS/summary.txt"

echo "== fake-quant inference latency (CUDA events, median of 50)" | tee -a "$RESULTS/summary.txt"
python - "$RESULTS/latency.json" <<'EOF' | tee -a "$RESULTS/summary.txt"
import json, statistics, sys
import torch
from fatq import QuantSpec, create_model

device = torch.device("cuda")
model = create_model("resnet20", spec=QuantSpec(4, 4)).to(device).eval()
results = {}
with torch.no_grad():
    for batch in (1, 256):
        x = torch.randn(batch, 3, 32, 32, device=device)
        for precision in ("fp32", "fp16"):
            times = []
            for i in range(60):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
                    model(x)
                end.record()
                torch.cuda.synchronize()
                if i >= 10:
                    times.append(start.elapsed_time(end))
            results[f"batch{batch}_{precision}_ms"] = statistics.median(times)
            print(f"batch {batch:3d} {precision}: {statistics.median(times):.3f} ms")
        ratio = results[f"batch{batch}_fp32_ms"] / results[f"batch{batch}_fp16_ms"]
        print(f"batch {batch:3d} fp32 / fp16: {ratio:.2f}")
results["gpu"] = torch.cuda.get_device_name(0)
results["torch"] = torch.__version__
json.dump(results, open(sys.argv[1], "w"), indent=2)
EOF
echo "results in $RESULTS"
