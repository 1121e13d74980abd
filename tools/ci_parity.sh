#!/usr/bin/env bash
# Accuracy-parity check run by CI: train ResNet-20 W4A4 briefly from the public FP32 checkpoint,
# export it to QDQ ONNX, and gate ONNX Runtime and OpenVINO against the PyTorch model on the full
# JPEG CIFAR-10 test split; then gate a second, differently made model (W4A4 PTQ) the same way.
# Exit status is fatq-bench's gate (1 = parity violated).
# Usage: tools/ci_parity.sh [WORK_DIR]   (needs FATQ_DATA_DIR and FATQ_PRETRAINED_DIR)
set -euo pipefail
: "${FATQ_DATA_DIR:?set FATQ_DATA_DIR to the directory holding cifar10-jpeg.tar.gz}"
: "${FATQ_PRETRAINED_DIR:?set FATQ_PRETRAINED_DIR to the directory holding resnet20-cifar10-fp32.th}"
work="${1:-$(mktemp -d)}"
mkdir -p "$work" "$work/ptq"
steps="${FATQ_CI_STEPS:-60}"

fatq-train --arch resnet20 --bits 4 --dataset cifar10 --data-dir "$FATQ_DATA_DIR" \
  --pretrained "$FATQ_PRETRAINED_DIR/resnet20-cifar10-fp32.th" --epochs 1 --max-steps "$steps" \
  --device cpu --job-dir "$work/train" --json "$work/train.json" --quiet
# The int8 export also writes resnet20-w4a4.reference.pt, the PyTorch model the file's engines compute
# (export/engine_exact.py): for this TensorRT file, whose biases are float, the model as trained with its
# residual-sum ranges and conv biases moved off rounding ties; --calib-data makes the moves avoid the values
# the train images reach (export/lattice_visits.py), the recommended use.
fatq-export "$work/train/last.pt" --format onnx -o "$work/resnet20-w4a4.onnx" --calib-data "$FATQ_DATA_DIR" --quiet
fatq-export "$work/train/last.pt" --format onnx-fp32 -o "$work/resnet20-w4a4-fp32.onnx" --quiet
# The engine-specific files: ONNX Runtime's uint8 QOperator ops with int32 biases (export/ort_writer.py;
# its .reference.pt has the biases on that grid) and OpenVINO FakeQuantize ops with float biases
# (export/openvino_writer.py; its .reference.pt is the portable file's model).
fatq-export "$work/train/last.pt" --format onnx-ort -o "$work/resnet20-w4a4-ort.onnx" --calib-data "$FATQ_DATA_DIR" --quiet
fatq-export "$work/train/last.pt" --format onnx-openvino -o "$work/resnet20-w4a4-ov.onnx" --calib-data "$FATQ_DATA_DIR" --quiet
# OpenVINO is parity-gated only on CPUs with VNNI (or no x86 int8 path at issue): on an AVX2-only CPU its
# int8 results differed from the deploy reference (94.5 % agreement measured on an AMD EPYC before the range
# Clips were written an ulp wide, see export/onnx_builder.py range_clip_bounds; not re-measured since, as no
# AVX2-only machine was at hand), so there it is run and reported, and gated on accuracy only (gate 2).
openvino_min_agreement="${FATQ_CI_OPENVINO_MIN_AGREEMENT:-99.9}"
gate_parity() {  # gate_parity ENGINE MIN_AGREEMENT REFERENCE REFERENCE_MODE NAME FILE...
  local engine="$1" min="$2" reference="$3" mode="$4" name="$5"
  shift 5
  fatq-bench "$@" --engine "$engine" --batch-sizes 64 --warmup 2 --iterations 5 --threads 2 \
    --data-dir "$FATQ_DATA_DIR" --reference "$reference" --reference-mode "$mode" --min-agreement "$min" \
    --json "$work/$name.json" --markdown "$work/$name.md" --quiet || { cat "$work/$name.md"; return 1; }
  cat "$work/$name.md"
}
openvino_gated=1
if [ "$(python -c 'from engines.host import saturating_u8s8; print(int(saturating_u8s8()))')" = 1 ]; then
  openvino_gated=0
  echo "ci_parity: AVX2 without VNNI: OpenVINO is not parity-gated on this CPU (docs/parity.md); reported below"
  fatq-bench "$work/resnet20-w4a4.onnx" "$work/resnet20-w4a4-ov.onnx" --engine openvino --batch-sizes 64 \
    --warmup 1 --iterations 2 --threads 2 --data-dir "$FATQ_DATA_DIR" --reference "$work/resnet20-w4a4.reference.pt" \
    --json "$work/bench-openvino-report.json" --markdown "$work/bench-openvino-report.md" --quiet
  cat "$work/bench-openvino-report.md"
fi
# Gate 1 (parity): each int8 engine, on each int8 file it reads, against the model it computes there:
# - OpenVINO adds the portable (TensorRT) file's float biases in float, as TensorRT does: its .reference.pt
#   (the onnx-openvino file's is the same model), eval mode;
# - ONNX Runtime rounds those float biases to int32 itself: the deploy reference of the same checkpoint
#   (--reference-mode deploy, int32 biases); on its own onnx-ort file, that file's .reference.pt (biases on
#   the int32 grid, export/engine_exact.py), eval mode.
portable_ref="$work/resnet20-w4a4.reference.pt"
gate_parity ort 99.9 "$portable_ref" deploy bench-parity-ort "$work/resnet20-w4a4.onnx"
gate_parity ort 99.9 "$work/resnet20-w4a4-ort.reference.pt" eval bench-parity-ort-file "$work/resnet20-w4a4-ort.onnx"
if [ "$openvino_gated" = 1 ]; then
  gate_parity openvino "$openvino_min_agreement" "$portable_ref" eval bench-parity-openvino "$work/resnet20-w4a4.onnx"
  gate_parity openvino "$openvino_min_agreement" "$work/resnet20-w4a4-ov.reference.pt" eval \
    bench-parity-openvino-file "$work/resnet20-w4a4-ov.onnx"
fi
# Gate 1b (parity on a second, differently made model): a W4A4 PTQ model of the same network (fatq-ptq:
# per-channel weight ranges, calibrated activation ranges, bias correction; no training), so that exact
# parity is checked on more than the one model this script trains.
fatq-ptq "$FATQ_PRETRAINED_DIR/resnet20-cifar10-fp32.th" --arch resnet20 --bits 4 --data-dir "$FATQ_DATA_DIR" \
  -o "$work/ptq/resnet20-ptq4.pt" --quiet
fatq-export "$work/ptq/resnet20-ptq4.pt" --format onnx -o "$work/ptq/resnet20-ptq4.onnx" --quiet
ptq_ref="$work/ptq/resnet20-ptq4.reference.pt"
gate_parity ort 99.9 "$ptq_ref" deploy bench-parity-ort-ptq "$work/ptq/resnet20-ptq4.onnx"
if [ "$openvino_gated" = 1 ]; then
  gate_parity openvino "$openvino_min_agreement" "$ptq_ref" eval bench-parity-openvino-ptq "$work/ptq/resnet20-ptq4.onnx"
fi
# Gate 2 (accuracy): no engine loses more than 1 point of top-1 against the model as trained. Top-1
# agreement with it is reported, not gated here: ONNX Runtime's int32 bias rounding flips ~4 % of a 4-bit
# model's predictions (docs/parity.md); OpenVINO's agreement with it is gate 1's.
fatq-bench "$work/resnet20-w4a4.onnx" --engine ort --engine openvino --batch-sizes 64 \
  --warmup 1 --iterations 2 --threads 2 --data-dir "$FATQ_DATA_DIR" --reference "$work/train/last.pt" \
  --max-accuracy-drop 1.0 --json "$work/bench-eval.json" --markdown "$work/bench-eval.md" --quiet
cat "$work/bench-eval.md"
