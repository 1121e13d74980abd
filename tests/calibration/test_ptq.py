"""PTQ: weight ranges, calibration batches, and the fatq-ptq CLI end to end on a tiny dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calibration.cli_ptq import main
from calibration.ptq import NormalizedBatches, evaluate_top1, mse_weight_alphas, ptq_spec, set_weight_ranges
from fatq.calibration_pass import activation_quantizers
from fatq.checkpoint import CIFAR_NORMALIZATION, load_fatq_checkpoint, model_from_checkpoint, save_checkpoint
from fatq.data import load_split, normalize
from fatq.models import create_model
from fatq.quantizers import PerChannelWeightQuantizer


def test_mse_weight_alphas_match_numpy_brute_force():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 300, generator=g) * torch.linspace(0.1, 2.0, 6)[:, None]
    alphas = mse_weight_alphas(w, 7).numpy()
    wn = w.double().numpy()
    for c in range(6):
        peak = np.abs(wn[c]).max()
        best, best_alpha = np.inf, None
        for fraction in np.linspace(0.2, 1.0, 81):
            step = peak * fraction / 7
            err = np.sum((wn[c] - np.clip(np.round(wn[c] / step), -7, 7) * step) ** 2)
            if err < best - 1e-12:
                best, best_alpha = err, peak * fraction
        assert alphas[c] == pytest.approx(best_alpha, rel=1e-9)
    assert np.all(alphas < np.abs(wn).max(axis=1))  # 4-bit (n = 7) Gaussian rows: clipping below the max pays off


@pytest.mark.parametrize("method", ["max", "mse"])
def test_set_weight_ranges(method):
    fp32 = create_model("resnet20", bits=32)
    model = create_model("resnet20", spec=ptq_spec(4))
    model.load_state_dict(fp32.state_dict(), strict=False)
    alphas = set_weight_ranges(model, method)
    assert "conv1.weight_quantizer" in alphas and "linear.weight_quantizer" in alphas
    for name, module in model.named_modules():
        if isinstance(module, PerChannelWeightQuantizer):
            layer = dict(model.named_modules())[name.rsplit(".", 1)[0]]
            peak = layer.weight.detach().flatten(1).abs().amax(dim=1)
            if method == "max":
                assert torch.allclose(module.alpha.detach(), peak)
            else:
                assert torch.all(module.alpha.detach() <= peak * (1 + 1e-6))
    with pytest.raises(Exception, match="weight method"):
        set_weight_ranges(model, "percentile")


def test_normalized_batches_subset_is_random_and_complete():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2).contiguous()
    batches = NormalizedBatches(images, {"mean": [0, 0, 0], "std": [1 / 255] * 3}, num_batches=3, batch_size=4)
    seen = torch.cat([b[:, 0, 0, 0] for b in batches])
    assert len(batches) == 3 and batches.num_images == 12
    assert seen.unique().numel() == 12 and not torch.equal(seen, torch.arange(12.0))  # shuffled, no repeats
    short = NormalizedBatches(images, {"mean": [0, 0, 0], "std": [1, 1, 1]}, num_batches=10, batch_size=8)
    assert len(short) == 3 and short.num_images == 20  # runs out of images


@pytest.fixture
def fp32_checkpoint(tmp_path, tiny_image_folder):
    model = create_model("resnet20", bits=32, num_classes=3)
    path = tmp_path / "fp32.pt"
    save_checkpoint(path, model, CIFAR_NORMALIZATION, ["class0", "class1", "class2"])
    return path, model


@pytest.mark.parametrize(
    ("bits", "method", "weights", "corrected"), [(8, "entropy", "max", False), (4, "percentile", "mse", True)]
)
def test_cli_end_to_end(tmp_path, tiny_image_folder, fp32_checkpoint, bits, method, weights, corrected, capsys):
    source, fp32 = fp32_checkpoint
    out, report = tmp_path / "ptq.pt", tmp_path / "ptq.json"
    argv = [str(source), "--bits", str(bits), "--data-dir", str(tiny_image_folder), "--calib-method", method]
    argv += ["--calib-batches", "2", "--batch-size", "4", "--weight-method", weights, "-o", str(out)]
    argv += ["--json", str(report), "--quiet"] + ([] if corrected else ["--no-bias-correction"])
    assert main(argv) == 0
    assert "test top-1" in capsys.readouterr().out
    data = load_fatq_checkpoint(out)  # weights_only load of the fatq format
    assert data["ptq"]["calib_method"] == method and data["ptq"]["calib_images"] == 8
    assert data["ptq"]["bias_correction"] is corrected
    assert data["spec"]["weight_bits"] == bits and data["spec"]["per_channel_weights"]
    assert data["provenance"]["command"].startswith("fatq-ptq") or "--bits" in data["provenance"]["command"]
    model = model_from_checkpoint(data)
    quantizers = activation_quantizers(model)
    assert all(q.enabled and q.initialized for q in quantizers.values())
    assert quantizers["conv1.input_quantizer"].bits == 8 and quantizers["layer1.0.conv1.input_quantizer"].bits == bits
    result = json.loads(report.read_text())
    assert set(result["activation_alphas"]) == set(quantizers)
    for path, alpha in result["activation_alphas"].items():
        assert float(quantizers[path].alpha.detach()) == pytest.approx(alpha)
    # the accuracy reported is the reloaded model's accuracy, measured again here
    test = load_split(tiny_image_folder, "test")
    assert evaluate_top1(model, test, data["normalization"], quiet=True) == result["test_top1"]
    # the FP32 weights went in unchanged; only quantizer state was added
    assert torch.equal(model.layer2[0].conv1.weight, fp32.layer2[0].conv1.weight)


def test_cli_public_checkpoint_needs_arch(tmp_path, tiny_image_folder):
    model = create_model("resnet20", bits=32, num_classes=3)
    public = tmp_path / "public.th"
    torch.save({"best_prec1": 0.0, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, public)
    base = [str(public), "--bits", "6", "--data-dir", str(tiny_image_folder), "--quiet", "--batch-size", "4"]
    assert main(base) == 2
    out = tmp_path / "p.pt"
    assert main([*base, "--arch", "resnet20", "-o", str(out)]) == 0
    data = load_fatq_checkpoint(out)
    assert data["ptq"]["source_format"] == "public" and data["num_classes"] == 3


def test_cli_bad_inputs(tmp_path, tiny_image_folder, fp32_checkpoint, capsys):
    source, _ = fp32_checkpoint
    data = ["--data-dir", str(tiny_image_folder), "--quiet"]
    out = tmp_path / "never.pt"
    quantized = tmp_path / "w4.pt"
    save_checkpoint(quantized, create_model("resnet20", bits=4, num_classes=3), CIFAR_NORMALIZATION)
    cases = [
        [str(tmp_path / "missing.pt"), "--bits", "8", *data, "-o", str(out)],
        [str(source), "--bits", "9", *data, "-o", str(out)],
        [str(source), "--bits", "32", *data, "-o", str(out)],
        [str(source), "--bits", "8", *data, "--calib-method", "percentile", "--percentile", "0", "-o", str(out)],
        [str(source), "--bits", "8", *data, "-o", str(tmp_path / "no" / "dir.pt")],
        [str(source), "--bits", "8", *data, "--arch", "resnet21", "-o", str(out)],
        [str(source), "--bits", "8", *data, "--arch", "resnet56", "-o", str(out)],
        [str(source), "--bits", "8", *data, "--calib-batches", "0", "-o", str(out)],
        [str(source), "--bits", "8", "--data-dir", str(tmp_path / "nodata"), "-o", str(out)],
        [str(quantized), "--bits", "8", *data, "-o", str(out)],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "error:" in err and "Traceback" not in err, err
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_ptq_checkpoint_exports_and_runs_in_onnxruntime(tmp_path, tiny_image_folder, fp32_checkpoint):
    """fatq-export takes the PTQ checkpoint like any other; ORT's logits follow PyTorch's."""
    pytest.importorskip("onnxruntime")

    from engines.export_cli import main as export_main

    source, _ = fp32_checkpoint
    out = tmp_path / "ptq8.pt"
    argv = [str(source), "--bits", "8", "--data-dir", str(tiny_image_folder), "--calib-method", "mse"]
    assert main([*argv, "--batch-size", "4", "-o", str(out), "--quiet"]) == 0
    onnx_path = tmp_path / "ptq8.onnx"
    assert export_main([str(out), "--format", "onnx", "-o", str(onnx_path), "--quiet"]) == 0
    data = load_fatq_checkpoint(out)
    model = model_from_checkpoint(data).eval()
    test = load_split(tiny_image_folder, "test")
    images = normalize(test.images, data["normalization"]["mean"], data["normalization"]["std"])
    from engines.ort_runner import OrtRunner

    # through fatq's runner: on AVX2 CPUs without VNNI it keeps ORT's int8 kernels, whose u8 x s8 form
    # saturates int16 pair sums with these 8-bit weights (engines/host.py)
    with OrtRunner(onnx_path, threads=1) as runner:
        got = np.concatenate([runner.infer({"input": images[i : i + 1].numpy()})["logits"] for i in range(len(images))])
    with torch.no_grad():
        expected = model(images).numpy()
    # integer engines requantize with their own rounding: allow a few output quantization steps
    spread = float(np.abs(expected).max())
    assert np.abs(got - expected).max() <= 0.02 * spread  # measured: 0.8 %
