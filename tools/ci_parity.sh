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
fatq-export "$work/train/last.pt" --format onnx -o "$work/resnet20-w4a4.onnx" --quiet
fatq-export "$work/train/last.pt" --format onnx-fp32 -o "$work/resnet20-w4a4-fp32.onnx" --quiet
fatq-bench "$work/resnet20-w4a4.onnx" --engine ort --engine openvino --batch-sizes 64 \
  --warmup 2 --iterations 5 --threads 2 --data-dir "$FATQ_DATA_DIR" --reference "$work/train/last.pt" \
  --min-agreement 99.9 --json "$work/bench.json" --markdown "$work/bench.md" --quiet
cat "$work/bench.md"
