#!/usr/bin/env bash
# The main job end to end on CPU: W4A4 FAT ResNet-20 from the public FP32 checkpoint (1 epoch,
# about 8 minutes on 2 cores), int8 ONNX export with a parity check (the portable QDQ file, the
# onnx-ort file for ONNX Runtime and the onnx-openvino file for OpenVINO), and an ORT/OpenVINO
# benchmark with the accuracy-parity gate.
# Usage: tools/demo.sh [OUT_DIR]   (data and weights default to ../shared beside the checkout;
#        override with FATQ_DATA_DIR and FATQ_PRETRAINED_DIR)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
data="${FATQ_DATA_DIR:-$root/../shared/datasets}"
weights="${FATQ_PRETRAINED_DIR:-$root/../shared/pretrained}"
out="${1:-$root/runs/demo}"
for need in "$data" "$weights/resnet20-cifar10-fp32.th"; do
  [ -e "$need" ] || { echo "demo: $need not found; set FATQ_DATA_DIR / FATQ_PRETRAINED_DIR." >&2; exit 2; }
done
mkdir -p "$out"

fatq-train --arch resnet20 --bits 4 --dataset cifar10 --data-dir "$data" \
  --pretrained "$weights/resnet20-cifar10-fp32.th" --epochs 1 --device cpu --job-dir "$out/train"
# writes resnet20-w4a4.reference.pt too: the PyTorch model TensorRT and OpenVINO compute on this file (README,
# docs/export.md); --check runs ONNX Runtime, which rounds the file's float biases to int32, against the model it computes
# (the deploy graph with int32 biases) and exits 1 below 99.9 % top-1 agreement on the test images
# (--calib-data: the moves that make the engines round alike avoid the values the train images reach)
fatq-export "$out/train/best.pt" --format onnx -o "$out/resnet20-w4a4.onnx" --calib-data "$data" \
  --check --check-images 10000 --data-dir "$data" --json "$out/export-check.json"
# the same integers as uint8 QOperator ops with int32 biases, for ONNX Runtime only (README, Export), with its
# own .reference.pt (the biases moved onto the int32 grid)
fatq-export "$out/train/best.pt" --format onnx-ort -o "$out/resnet20-w4a4-ort.onnx" --calib-data "$data"
# the same integers with OpenVINO's FakeQuantize for the 4-bit quantizers, for OpenVINO only
fatq-export "$out/train/best.pt" --format onnx-openvino -o "$out/resnet20-w4a4-ov.onnx" --calib-data "$data"
fatq-export "$out/train/best.pt" --format onnx-fp32 -o "$out/resnet20-w4a4.fp32.onnx"
# speed and accuracy of int8 and fp32 side by side (the fp32 twin has no activation quantization, so
# only the accuracy bound applies to it; each engine skips the other's own file, with the reason) ...
fatq-bench "$out/resnet20-w4a4.onnx" "$out/resnet20-w4a4-ort.onnx" "$out/resnet20-w4a4-ov.onnx" \
  "$out/resnet20-w4a4.fp32.onnx" \
  --engine ort --engine openvino \
  --batch-sizes 1,64 --threads 2 --data-dir "$data" --reference "$out/resnet20-w4a4.reference.pt" \
  --max-accuracy-drop 1.0 --json "$out/bench.json" --markdown "$out/bench.md" --plot "$out/bench.png"
# ... and the parity gate on the int8 engines, each against the model it computes on each file: ONNX Runtime
# rounds the portable (TensorRT) file's float biases to int32 (the deploy reference of its .reference.pt) and
# computes the onnx-ort file's own .reference.pt; OpenVINO computes the float-bias .reference.pt. OpenVINO is
# gated only on CPUs where its int8 kernels are exact (not on AVX2 without VNNI; the benchmark above still
# reports it; docs/parity.md)
fatq-bench "$out/resnet20-w4a4.onnx" --engine ort --batch-sizes 64 --iterations 5 --threads 2 --data-dir "$data" \
  --reference "$out/resnet20-w4a4.reference.pt" --reference-mode deploy --min-agreement 99.9 \
  --json "$out/parity-ort.json" --quiet
fatq-bench "$out/resnet20-w4a4-ort.onnx" --engine ort --batch-sizes 64 --iterations 5 --threads 2 --data-dir "$data" \
  --reference "$out/resnet20-w4a4-ort.reference.pt" --min-agreement 99.9 --json "$out/parity-ort-file.json" --quiet
if [ "$(python -c 'from engines.host import saturating_u8s8; print(int(saturating_u8s8()))')" = 1 ]; then
  echo "demo: AVX2 without VNNI: the parity gate runs ONNX Runtime only on this CPU (docs/parity.md)"
else
  fatq-bench "$out/resnet20-w4a4.onnx" "$out/resnet20-w4a4-ov.onnx" --engine openvino --batch-sizes 64 \
    --iterations 5 --threads 2 --data-dir "$data" --reference "$out/resnet20-w4a4.reference.pt" \
    --min-agreement 99.9 --json "$out/parity-openvino.json" --quiet
fi
echo "demo: artifacts in $out"
