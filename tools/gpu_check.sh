#!/usr/bin/env bash
# One-shot check of fatq's CUDA paths, for a machine with an NVIDIA GPU. Ran on an H200 on 2026-12-04; the
# figures and how to read them are in docs/training.md ("On a CUDA GPU").
#
#   tools/gpu_check.sh DATA_DIR PRETRAINED [STEPS]
#
# DATA_DIR: directory holding cifar10-jpeg.tar.gz (or the .tar.gz itself), carried to the machine with the
# repo; PRETRAINED: the public FP32 ResNet-20 checkpoint (resnet20-cifar10-fp32.th); STEPS: training steps of
# the speed runs (default 300). Needs PyTorch with CUDA, torchvision, numpy, pillow and tqdm; no network; runs
# from the source tree (PYTHONPATH), so the machine's own torch is used whatever pyproject.toml pins.
# Environment: SECTIONS (default "1 2 3 4 5 6": which of the sections below run); SEEDS (default "1 2 3") for
# the placement runs; BUDGET_S (default 300): no placement run starts after this many seconds. Every section runs
# under `timeout`, logs to its own file and records its exit status in summary.txt, so one failing section does
# not hide the others. Results go to $OUT (if set) or
# ./gpu_check_out:
#   1. speed: fatq-train ResNet-20 W4A4 on CUDA for STEPS steps, without and with --amp (train_fp32.json,
#      train_amp.json; images/s of the training loop, wall time, top-1); the fp32 run's checkpoint is kept as
#      cuda_w4a4.pt for an export and engine-parity check on a CPU machine;
#   2. benchmarks/train_step.py --device cuda (FAT with batched and per-layer weight paths, no-transform, FP32,
#      FAT captured as a CUDA graph; with and without --amp);
#   3. CUDA latency of the fake-quant W4A4 model in eval mode, fp32 vs fp16 autocast, batch 1 and 256;
#   4. the streaming loader: DataLoader workers decoding vs --gpu-decode (nvJPEG), 100 steps each;
#   5. DDP through torchrun on one GPU (NCCL, world size 1), 20 steps;
#   6. quantizer placements: --target portable|trt|cpu, W4A4, one epoch from the public FP32 checkpoint, for
#      each seed in SEEDS, one run after another (placement_<target>_s<seed>.json; three at a time took 4x
#      longer each, on 16 cores).
set -uo pipefail

DATA_DIR=${1:-${FATQ_DATA_DIR:-}}
PRETRAINED=${2:-}
STEPS=${3:-300}
SECTIONS=${SECTIONS:-1 2 3 4 5 6}
SEEDS=${SEEDS:-1 2 3}
BUDGET_S=${BUDGET_S:-300}
if [[ -z "$DATA_DIR" || ! -e "$DATA_DIR" || -z "$PRETRAINED" || ! -f "$PRETRAINED" ]]; then
    echo "usage: $0 DATA_DIR PRETRAINED [STEPS]  (DATA_DIR and the PRETRAINED checkpoint must exist)" >&2
    exit 2
fi
DATA_DIR=$(realpath "$DATA_DIR")
PRETRAINED=$(realpath "$PRETRAINED")
REPO=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=${OUT:-$PWD/gpu_check_out}
mkdir -p "$RESULTS"
RESULTS=$(realpath "$RESULTS")
PY=$(command -v python3 || command -v python)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FATQ_CACHE_DIR=${FATQ_CACHE_DIR:-${TMPDIR:-/tmp}/fatq-cache}  # decoded data stays out of $RESULTS
mkdir -p "$FATQ_CACHE_DIR"
cd "$REPO"
START=$SECONDS
SUMMARY="$RESULTS/summary.txt"

say() { echo "$*" | tee -a "$SUMMARY"; }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }  # want N: section N was asked for

# section NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in NAME.log and records its exit status.
section() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    local rc=$?
    say "[$name] rc $rc, $((SECONDS - t0)) s"
    return $rc
}

# train NAME TIMEOUT_S ARGS...: a fatq-train section on CUDA into job_NAME, its summary in NAME.json
train() {
    local name=$1 limit=$2
    shift 2
    section "$name" "$limit" "$PY" -m fatq.cli_train --arch resnet20 --dataset cifar10 --data-dir "$DATA_DIR" \
        --device cuda --quiet --job-dir "$RESULTS/job_$name" --json "$RESULTS/$name.json" "$@"
}

# report NAME: one line from NAME.json and job_NAME/metrics.jsonl
report() {
    "$PY" - "$RESULTS/$1.json" "$RESULTS/job_$1/metrics.jsonl" "$1" <<'EOF' | tee -a "$SUMMARY"
import json, sys
summary = json.load(open(sys.argv[1]))
records = [json.loads(line) for line in open(sys.argv[2])]
images = sum(r.get("train_images", 0) for r in records)
seconds = sum(r.get("train_seconds", 0.0) for r in records)
print(f"  {sys.argv[3]}: steps {summary['steps']}  top-1 {summary['top1']:.2f} %  "
      f"train {images / max(seconds, 1e-9):.0f} images/s (training loop only)")
EOF
}

say "== environment"
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib.util, os, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "cpus", os.cpu_count())
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to PyTorch")
print("gpu", torch.cuda.get_device_name(0), "count", torch.cuda.device_count())
missing = [m for m in ("numpy", "PIL", "tqdm", "torchvision") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {missing}")
EOF
[[ ${PIPESTATUS[0]} == 0 ]] || exit 1
# the commit of the copy's .git may predate its working tree (a copied checkout): also hash the sources themselves
git -C "$REPO" rev-parse HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$SUMMARY"
find fatq export engines calibration benchmarks tools -name '*.py' -o -name '*.sh' | sort | xargs cat | sha256sum \
    | cut -c1-16 | sed 's/^/sources sha256 /' | tee -a "$SUMMARY"

if want 1; then
say "== 1. train W4A4 on CUDA, $STEPS steps, fp32 and --amp"
for mode in fp32 amp; do
    AMP=()
    if [[ $mode == amp ]]; then AMP=(--amp); fi
    train "train_$mode" 400 --bits 4 --pretrained "$PRETRAINED" --epochs 2 \
        --max-steps "$STEPS" ${AMP[@]+"${AMP[@]}"} && report "train_$mode"
done
cp "$RESULTS/job_train_fp32/last.pt" "$RESULTS/cuda_w4a4.pt" 2>/dev/null
fi

if want 2; then
say "== 2. benchmarks/train_step.py"
section train_step 120 "$PY" benchmarks/train_step.py --device cuda --steps 30 --warmup 5 \
    --json "$RESULTS/train_step.json"
tee -a "$SUMMARY" <"$RESULTS/train_step.log"
section train_step_amp 120 "$PY" benchmarks/train_step.py --device cuda --steps 30 --warmup 5 --amp \
    --json "$RESULTS/train_step_amp.json"
tee -a "$SUMMARY" <"$RESULTS/train_step_amp.log"
fi

if want 3; then
say "== 3. fake-quant inference latency (CUDA events, median of 50)"
section latency 120 "$PY" - "$RESULTS/latency.json" <<'EOF'
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
tee -a "$SUMMARY" <"$RESULTS/latency.log"
fi

if want 4; then
say "== 4. streaming loader: worker decoding vs --gpu-decode, 100 steps"
WORKERS=$(( $(nproc) > 8 ? 8 : $(nproc) ))
train stream_workers 240 --bits 4 --pretrained "$PRETRAINED" --epochs 1 --max-steps 100 \
    --loader stream --workers "$WORKERS" && report stream_workers
train stream_gpu_decode 240 --bits 4 --pretrained "$PRETRAINED" --epochs 1 \
    --max-steps 100 --loader stream --gpu-decode --workers "$WORKERS" && report stream_gpu_decode
fi

if want 5; then
say "== 5. DDP through torchrun on one GPU (NCCL), 20 steps"
section ddp 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m fatq.cli_train --arch resnet20 \
    --bits 4 --data-dir "$DATA_DIR" --device cuda --quiet --pretrained "$PRETRAINED" --epochs 1 --max-steps 20 \
    --job-dir "$RESULTS/job_ddp" --json "$RESULTS/ddp.json" && report ddp
fi

if want 6; then
say "== 6. placements, W4A4, one epoch from FP32, seeds: $SEEDS"
for seed in $SEEDS; do
    if (( SECONDS - START > BUDGET_S )); then
        say "  budget of $BUDGET_S s spent: seed $seed and later not run"
        break
    fi
    for target in portable trt cpu; do
        train "placement_${target}_s$seed" 300 --bits 4 --pretrained "$PRETRAINED" --epochs 1 --seed "$seed" \
            --target "$target" && report "placement_${target}_s$seed"
    done
done
fi
rm -f "$RESULTS"/job_*/*.pt  # checkpoints other than cuda_w4a4.pt are not needed back
say "total $((SECONDS - START)) s; results in $RESULTS"
