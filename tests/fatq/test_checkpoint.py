"""Checkpoints: round trip, progressive initialisation (FP32 -> FAT, b+1 -> b), the public format, clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from fatq.checkpoint import (
    CIFAR_NORMALIZATION,
    IMAGENET_NORMALIZATION,
    init_from_pretrained,
    load_fatq_checkpoint,
    model_from_checkpoint,
    read_checkpoint_file,
    save_checkpoint,
)
from fatq.data import load_split, normalize
from fatq.errors import CheckpointError, FatqError
from fatq.models import create_model
from fatq.provenance import __version__

CLASSES = [f"class{i}" for i in range(10)]


def trained_like(name: str = "resnet20", bits=4, **options) -> torch.nn.Module:
    """A model whose every parameter and buffer differs from its fresh initialisation."""
    model = create_model(name, bits=bits, **options)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # initialises the data-driven quantizers, moves BN statistics
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p) * 0.01)
    return model


def save(model, path, **extra):
    save_checkpoint(path, model, CIFAR_NORMALIZATION, CLASSES, **extra)
    return path


def test_round_trip_is_exact_and_weights_only(tmp_path):
    model = trained_like(shortcut="B")
    model.layer1[0].branch_quantizer.enabled = False  # a flag kept as extra state must survive too
    path = save(model, tmp_path / "model.pt", epoch=7, metrics={"top1": 12.5})
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["arch"] == "resnet20" and raw["arch_options"] == {"shortcut": "B"}
    assert raw["spec"]["weight_bits"] == 4 and raw["num_classes"] == 10
    assert raw["normalization"] == {k: list(v) for k, v in CIFAR_NORMALIZATION.items()}
    assert raw["class_names"] == CLASSES and raw["epoch"] == 7 and raw["metrics"] == {"top1": 12.5}
    assert raw["fatq_version"] == __version__ and "git_commit" in raw
    assert raw["layers"]["layer1.0.conv1.weight_quantizer"]["int_range"] == [-7, 7]
    assert raw["layers"]["layer1.0.shortcut_quantizer"]["int_range"] == [0, 127]

    restored = model_from_checkpoint(load_fatq_checkpoint(path))
    original, loaded = model.state_dict(), restored.state_dict()
    assert original.keys() == loaded.keys()
    for key, value in original.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, loaded[key]), key
        else:
            assert value == loaded[key], key
    assert not restored.layer1[0].branch_quantizer.enabled
    x = torch.randn(2, 3, 32, 32)
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_fp32_checkpoint_initialises_fat_model(tmp_path):
    fp32 = trained_like(bits=32)
    path = save(fp32, tmp_path / "fp32.pt")
    fat = create_model("resnet20", bits=4)
    meta = init_from_pretrained(fat, path)
    assert meta["format"] == "fatq-checkpoint" and meta["class_names"] == CLASSES
    fat_state = fat.state_dict()
    for key, value in fp32.state_dict().items():
        assert torch.equal(fat_state[key], value), key
    # New quantizer parameters keep their initial values.
    conv = fat.layer2[1].conv1
    assert torch.all(conv.weight_transform.mask.weight == 1 / 32)
    assert conv.weight_quantizer.alpha.item() == 3.0 and conv.input_quantizer.alpha.item() == 5.0


def test_higher_bit_checkpoint_initialises_lower_bit_model(tmp_path):
    """Progressive b+1 -> b: learned alphas and masks carry over; the integer range is the new model's."""
    five = trained_like(bits=5)
    path = save(five, tmp_path / "w5.pt")
    four = create_model("resnet20", bits=4)
    init_from_pretrained(four, path)
    four_state = four.state_dict()
    for key, value in five.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(four_state[key], value), key
    assert four.layer3[2].conv2.weight_quantizer.int_range == (-7, 7)
    assert four.layer3[2].conv2.input_quantizer.int_range == (0, 15)


def test_public_checkpoint_initialises_fp32_and_fat(pretrained_dir):
    path = pretrained_dir / "resnet20-cifar10-fp32.th"
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for bits in (32, 4):
        model = create_model("resnet20", bits=bits)
        meta = init_from_pretrained(model, path)
        assert meta["format"] == "public" and meta["normalization"] == IMAGENET_NORMALIZATION
        assert torch.equal(model.conv1.weight, raw["module.conv1.weight"])
        assert torch.equal(model.layer3[2].bn2.running_var, raw["module.layer3.2.bn2.running_var"])
        assert torch.equal(model.linear.bias, raw["module.linear.bias"])


@pytest.mark.parametrize(
    "target,match",
    [
        (lambda: create_model("resnet56"), r"missing keys \['layer1\.3"),
        (lambda: create_model("resnet20", shortcut="B"), r"missing keys \['layer2\.0\.shortcut"),
        (lambda: create_model("resnet20", num_classes=100), r"linear\.weight has shape \(10, 64\)"),
        (lambda: create_model("vgg_small", bits=4), r"does not fit vgg_small.*unexpected keys \['conv1"),
    ],
    ids=["deeper", "other-shortcut", "other-classes", "other-family"],
)
def test_public_checkpoint_into_wrong_architecture(pretrained_dir, target, match):
    with pytest.raises(CheckpointError, match=match):
        init_from_pretrained(target(), pretrained_dir / "resnet20-cifar10-fp32.th")


def test_fatq_checkpoint_into_wrong_architecture(tmp_path):
    path = save(create_model("resnet20", bits=4), tmp_path / "r20.pt")
    with pytest.raises(CheckpointError, match="holds a resnet20, not a resnet32"):
        init_from_pretrained(create_model("resnet32", bits=4), path)
    data = load_fatq_checkpoint(path)
    del data["state_dict"]["layer2.1.conv2.weight"]
    with pytest.raises(CheckpointError, match=r"missing \['layer2\.1\.conv2\.weight'\]"):
        model_from_checkpoint(data)


def test_unreadable_files(tmp_path, pretrained_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint_file(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint_file(garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((pretrained_dir / "resnet20-cifar10-fp32.th").read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint_file(truncated)
    pickled = tmp_path / "pickled.pt"  # arbitrary objects are refused by weights_only loading
    pickled.write_bytes(pickle.dumps({"state_dict": CheckpointError("x")}, protocol=2))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint_file(pickled)
    no_state = tmp_path / "no_state.pt"
    torch.save({"weights": torch.zeros(1)}, no_state)
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        read_checkpoint_file(no_state)
    with pytest.raises(CheckpointError, match="not a fatq checkpoint"):
        load_fatq_checkpoint(pretrained_dir / "resnet20-cifar10-fp32.th")


def test_save_into_missing_directory_fails_cleanly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        save(create_model("resnet20"), tmp_path / "nowhere" / "m.pt")


@pytest.mark.data
def test_public_resnet20_accuracy_on_jpeg_cifar10(data_dir, pretrained_dir):
    """The public FP32 ResNet-20 scores 81.03 % on the JPEG CIFAR-10 test split (pretrained/README.md)."""
    model = create_model("resnet20", bits=32)
    meta = init_from_pretrained(model, pretrained_dir / "resnet20-cifar10-fp32.th")
    split = load_split(data_dir, "test", "cifar10")
    assert len(split) == 10_000 and split.images.shape[1:] == (3, 32, 32)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(split), 500):
            images = normalize(split.images[start : start + 500], **meta["normalization"])
            correct += (model(images).argmax(1) == split.labels[start : start + 500]).sum().item()
    assert 100.0 * correct / len(split) == pytest.approx(81.0, abs=0.3)


@pytest.mark.parametrize("change", [{"full_range_9bit": True}, {"version": 99}])
def test_spec_from_a_newer_fatq_is_refused_not_dropped(tmp_path, change):
    """Settings this fatq does not know would be dropped silently, building another model than the trained one."""
    path = save(trained_like(), tmp_path / "model.pt")
    data = torch.load(path, map_location="cpu", weights_only=True)
    data["spec"] = {**data["spec"], **change}
    torch.save(data, path)
    with pytest.raises(FatqError, match="a newer fatq wrote it"):
        model_from_checkpoint(load_fatq_checkpoint(path))
