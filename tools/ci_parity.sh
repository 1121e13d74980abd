#!/usr/bin/env bash
# Accuracy-parity check run by CI: train ResNet-20 W4A4 briefly from the public FP32 checkpoint,
# export it to QDQ ONNX, and gate ONNX Runtime and OpenVINO against the PyTorch model on the full
# JPEG CIFAR-10 test split. Exit status is fatq-bench's gate (1 = parity violated).
# Usage: tools/ci_parity.sh [WORK_DIR]   (needs FATQ_DATA_DIR and FATQ_PRETRAINED_DIR)
set -euo pipefail
: "${FATQ_DATA_DIR:?set FATQ_DATA_DIR to the directory holding cifar10-jpeg.tar.gz}"
: "${FATQ_PRETRAINED_DIR:?set FATQ_PRETRAINED_DIR to the directory holding resnet20-cifar10-fp32.th}"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
steps="${FATQ_CI_STEPS:-60}"

fatq-train --arch resnet20 --bits 4 --dataset cifar10 --data-dir "$FATQ_DATA_DIR" \
  --pretrained "$FATQ_PRETRAINED_DIR/resnet20-cifar10-fp32.th" --epochs 1 --max-steps "$steps" \
  --device cpu --job-dir "$work/train" --json "$work/train.json" --quiet
# The int8 export also writes resnet20-w4a4.reference.pt: the checkpoint with its biases moved onto
# the engines' int32 grid (export/engine_exact.py), i.e. the PyTorch model the int8 file computes.
fatq-export "$work/train/last.pt" --format onnx -o "$work/resnet20-w4a4.onnx" --quiet
fatq-export "$work/train/last.pt" --format onnx-fp32 -o "$work/resnet20-w4a4-fp32.onnx" --quiet
# The engine-specific files: the same integers as ONNX Runtime's uint8 QOperator ops (export/ort_writer.py)
# and with OpenVINO FakeQuantize ops (export/openvino_writer.py), each with the same .reference.pt model.
fatq-export "$work/train/last.pt" --format onnx-ort -o "$work/resnet20-w4a4-ort.onnx" --quiet
fatq-export "$work/train/last.pt" --format onnx-openvino -o "$work/resnet20-w4a4-ov.onnx" --quiet
# Gate 1 (parity): every int8 engine, on every int8 file it reads, agrees >= 99.9 % top-1 with that
# PyTorch model (fatq-bench skips, with the reason, an engine-specific file on the other engine).
# OpenVINO is gated only on CPUs with VNNI (or no x86 int8 path at issue): on an AVX2-only CPU its int8
# results differ from the deploy reference (94.5 % agreement measured on an AMD EPYC, the same symptom
# as the u8 x s8 int16 saturation of ONNX Runtime's kernels there, engines/host.py; not traced inside
# OpenVINO), so there it is run and reported, and gated on accuracy only (gate 2).
parity_engines=(--engine ort --engine openvino)
if [ "$(python -c 'from engines.host import saturating_u8s8; print(int(saturating_u8s8()))')" = 1 ]; then
  parity_engines=(--engine ort)
  echo "ci_parity: AVX2 without VNNI: OpenVINO is not parity-gated on this CPU (docs/parity.md); reported below"
  fatq-bench "$work/resnet20-w4a4.onnx" "$work/resnet20-w4a4-ov.onnx" --engine openvino --batch-sizes 64 \
    --warmup 1 --iterations 2 --threads 2 --data-dir "$FATQ_DATA_DIR" --reference "$work/resnet20-w4a4.reference.pt" \
    --json "$work/bench-openvino-report.json" --markdown "$work/bench-openvino-report.md" --quiet
  cat "$work/bench-openvino-report.md"
fi
fatq-bench "$work/resnet20-w4a4.onnx" "${parity_engines[@]}" --batch-sizes 64 \
  --warmup 2 --iterations 5 --threads 2 --data-dir "$FATQ_DATA_DIR" --reference "$work/resnet20-w4a4.reference.pt" \
  --min-agreement 99.9 --json "$work/bench-parity.json" --markdown "$work/bench-parity.md" --quiet
cat "$work/bench-parity.md"
targeted=("$work/resnet20-w4a4-ort.onnx" "$work/resnet20-w4a4-ov.onnx")
[ "${#parity_engines[@]}" = 4 ] || targeted=("$work/resnet20-w4a4-ort.onnx")
fatq-bench "${targeted[@]}" "${parity_engines[@]}" \
  --batch-sizes 64 --warmup 2 --iterations 5 --threads 2 --data-dir "$FATQ_DATA_DIR" \
  --reference "$work/resnet20-w4a4-ort.reference.pt" --min-agreement 99.9 \
  --json "$work/bench-parity-targeted.json" --markdown "$work/bench-parity-targeted.md" --quiet
cat "$work/bench-parity-targeted.md"
# Gate 2 (accuracy): no engine loses more than 1 point of top-1 against the model as trained. Top-1
# agreement with it is reported, not gated: a 4-bit model flips ~5 % of its predictions when its biases
# move by the int32 rounding every integer engine imposes (README, Export).
fatq-bench "$work/resnet20-w4a4.onnx" --engine ort --engine openvino --batch-sizes 64 \
  --warmup 1 --iterations 2 --threads 2 --data-dir "$FATQ_DATA_DIR" --reference "$work/train/last.pt" \
  --max-accuracy-drop 1.0 --json "$work/bench-eval.json" --markdown "$work/bench-eval.md" --quiet
cat "$work/bench-eval.md"
