"""fatq-import: a FAT reference-code checkpoint becomes a fatq model that computes the reference forward.

The reference is tests/reference_forward.py, an independent re-implementation of the reference
forward from METHOD.md that reads the reference state dict itself. Checked on synthetic
reference-format checkpoints (2/3/5/8 bits, one stem with min(W) < −max(W)) and on the authors'
W4A4 ResNet-20 (skipped without FATQ_PRETRAINED_DIR; its 10,000-image agreement needs the data too).
"""

from __future__ import annotations

import pytest
import torch
from reference_forward import ReferenceForward, reference_state, save_reference

from fatq.checkpoint import load_fatq_checkpoint, model_from_checkpoint
from fatq.cli_import import main as import_main
from fatq.data import load_split, normalize
from fatq.errors import CheckpointError, FatqError
from fatq.layers import QUANTIZED_LAYERS
from fatq.models import create_model
from fatq.qconfig import QuantSpec
from fatq.reference_import import CIFAR10_CLASSES, import_reference

REFERENCE_W4A4 = "fat-reference/resnet_20_4bit.pth.tar"


def layer_integers(model) -> dict:
    """fatq integers by the reference's layer names (shortcut -> downsample), written independently."""
    return {
        name.replace("shortcut.", "downsample."): layer.weight_integers()[0]
        for name, layer in model.named_modules()
        if isinstance(layer, QUANTIZED_LAYERS)
    }


def assert_same_integers(model, reference: ReferenceForward) -> None:
    ours = layer_integers(model)
    assert sorted(ours) == sorted(reference.integers)
    for name, q in ours.items():
        differ = int((q != reference.integers[name]).sum())
        assert differ == 0, f"{name}: {differ} of {q.numel()} integers differ"


@pytest.mark.parametrize(
    "arch, bits, negative_stem",
    [
        ("resnet20", 2, False),
        ("resnet20", 3, True),
        ("resnet20", 5, False),
        ("resnet20", 8, True),
        pytest.param("vgg_small", 4, True, marks=pytest.mark.slow),  # 512-channel FFTs, twice (float32, float64)
    ],
)
def test_synthetic_reference_checkpoint_imports_to_the_reference_forward(tmp_path, arch, bits, negative_stem):
    state = reference_state(arch, bits, seed=bits, negative_stem=negative_stem)
    model, report = import_reference(save_reference(tmp_path, state), arch, bits)
    reference = ReferenceForward(state, bits)
    assert_same_integers(model, reference)
    stem = "conv1" if arch.startswith("resnet") else "features.0"
    assert report.dropped_keys == sorted([f"{stem}.transform.weight", f"{reference.classifier}.transform.weight"])
    lo, _ = report.edge_integer_ranges[stem]
    assert (lo < -127) == negative_stem and (stem in report.beyond_int8) == negative_stem
    # the same function: in float64 (both sides) the float32 summation-order noise that flips activation
    # rounding ties (fatq sums integer products exactly, the reference sums fake-quant products) is gone
    model64 = import_reference(save_reference(tmp_path, state), arch, bits)[0].double()
    reference64 = ReferenceForward({k: v.double() if v.is_floating_point() else v for k, v in state.items()}, bits)
    assert_same_integers(model64, reference64)
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = model64(images), reference64(images)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-8 * float(theirs.abs().max()))


def test_fp32_reference_checkpoint_imports_as_a_float_model(tmp_path):
    state = reference_state("resnet20", 32)
    model, report = import_reference(save_reference(tmp_path, state), "resnet20", 32)
    assert model.spec.is_float and report.dropped_keys == []
    expected = create_model("resnet20", bits=32, shortcut="B")
    expected.load_state_dict({k.replace("downsample.", "shortcut."): v for k, v in state.items()})
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), expected.eval()(images))


def test_cli_writes_an_ordinary_fatq_checkpoint(tmp_path, capsys):
    state = reference_state("resnet20", 4, negative_stem=True)
    source, out = save_reference(tmp_path, state), tmp_path / "model.pt"
    assert import_main([source, "--arch", "resnet20", "--bits", "4", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "conv1.transform.weight" in printed and "below -127" in printed
    data = load_fatq_checkpoint(out)
    assert data["class_names"] == CIFAR10_CLASSES and data["normalization"]["std"] == [0.2023, 0.1994, 0.2010]
    assert data["imported_from"]["format"] == "fat-reference" and len(data["imported_from"]["sha256"]) == 64
    assert data["spec"]["edge_weights"] == "signed_max" and data["spec"]["act_clamp"] == "top"
    reloaded = model_from_checkpoint(data).eval()
    assert_same_integers(reloaded, ReferenceForward(state, 4))


@pytest.mark.parametrize(
    "edit, arch, bits, message",
    [
        (lambda s: s.pop("layer2.0.downsample.0.act_alpha"), "resnet20", 4, "missing keys .*downsample.0.act_alpha"),
        (lambda s: s.update(extra=torch.zeros(1)), "resnet20", 4, r"unexpected keys \['extra'\]"),
        (lambda s: None, "resnet32", 4, "holds a resnet20"),
        (lambda s: None, "resnet20", 32, "FAT-quantized model"),
        (lambda s: None, "mobilenetv2", 4, "mobilenetv2 cannot be imported"),
    ],
)
def test_mismatches_are_one_sentence_errors(tmp_path, capsys, edit, arch, bits, message):
    state = reference_state("resnet20", 4)
    edit(state)
    source, out = save_reference(tmp_path, state), tmp_path / "model.pt"
    with pytest.raises(FatqError, match=message):
        import_reference(source, arch, bits)
    assert import_main([source, "--arch", arch, "--bits", str(bits), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and not out.exists()


def test_fp32_file_imported_with_bits_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="FP32 model"):
        import_reference(save_reference(tmp_path, reference_state("resnet20", 32)), "resnet20", 4)


def test_spec_defaults_keep_existing_models_unchanged():
    """Old checkpoints' specs lack the new fields: they build the project-rule quantizers."""
    old = {k: v for k, v in QuantSpec.from_bits(4).to_dict().items() if k not in ("edge_weights", "act_clamp")}
    model = create_model("resnet20", spec=QuantSpec.from_dict(old))
    assert model.conv1.weight_quantizer.kind == "max_abs"
    assert type(model.layer1[0].conv1.input_quantizer).__name__ == "ActivationQuantizer"


def test_shared_w4a4_checkpoint_has_the_reference_integers(pretrained_dir):
    path = pretrained_dir / REFERENCE_W4A4
    model, report = import_reference(path, "resnet20", 4)
    reference = ReferenceForward(torch.load(path, map_location="cpu", weights_only=True)["state_dict"], 4)
    assert_same_integers(model, reference)
    assert report.sha256.startswith("7b23be55") and report.epoch == 377
    assert report.edge_integer_ranges == {"conv1": [-122, 127], "linear": [-28, 127]} and report.beyond_int8 == []


@pytest.mark.data
@pytest.mark.slow
def test_shared_w4a4_checkpoint_agrees_with_the_reference_forward_on_the_test_split(pretrained_dir, data_dir):
    """≥ 99.9 % top-1 agreement on the 10,000 test images, accuracy within 0.05 pt (README: 81.83 %)."""
    path = pretrained_dir / REFERENCE_W4A4
    model, _ = import_reference(path, "resnet20", 4)
    reference = ReferenceForward(torch.load(path, map_location="cpu", weights_only=True)["state_dict"], 4)
    split = load_split(data_dir, "test")
    ours, theirs = [], []
    with torch.no_grad():
        for start in range(0, len(split), 500):
            images = normalize(split.images[start : start + 500], [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
            ours.append(model(images).argmax(1))
            theirs.append(reference(images).argmax(1))
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    assert (ours == theirs).float().mean().item() >= 0.999
    accuracy = [100.0 * (p == split.labels).float().mean().item() for p in (ours, theirs)]
    assert abs(accuracy[0] - accuracy[1]) <= 0.05
    assert accuracy[1] == pytest.approx(81.83, abs=0.05)  # the README's independent forward: 81.83 %
