"""Model zoo: every registry model trains (finite outputs, gradients everywhere), traces with torch.fx,
uses signed quantizers exactly where inputs go negative, and matches torchvision where it claims to."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

from fatq.errors import FatqError
from fatq.layers import QuantConv2d, QuantLinear
from fatq.models import create_model, list_models, model_info
from fatq.quantizers import ActivationQuantizer
from fatq.transform import FATTransform

ZOO = [
    "mobilenetv2",
    "resnet110",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet56",
    "vgg16_bn",
    "vgg_small",
]
BITS = [32, 4, (3, 5)]
QUANTIZER_CHILDREN = ("weight_transform.", "weight_quantizer.", "input_quantizer.", "branch_quantizer.")
TORCHVISION = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "mobilenetv2": torchvision.models.mobilenet_v2,
}


def test_input_sizes_and_families():
    """Models with a nominal 224x224 input take a 64x64 image here: they end in a global pool."""
    assert list_models() == ZOO
    for name in ZOO:
        imagenet = name in TORCHVISION
        info = model_info(name)
        assert info.family == ("imagenet" if imagenet else "cifar")
        assert info.input_size == ((3, 224, 224) if imagenet else (3, 32, 32))


def small_input(name: str, batch: int = 2) -> torch.Tensor:
    size = 64 if model_info(name).family == "imagenet" else 32
    return torch.randn(batch, 3, size, size)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b[0]}a{b[1]}" if isinstance(b, tuple) else f"bits{b}")
@pytest.mark.parametrize("name", ZOO)
def test_forward_backward(name, bits):
    model = create_model(name, bits=bits, num_classes=7).train()
    out = model(small_input(name))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        # FAT masks are exempt: at init their gate sigmoid(mean_c |FFT|) saturates to exactly 1.0 in
        # float32 once N = numel / C_out reaches ~450 (mean |F| ~ 0.89 sqrt(N)), so their gradient is 0.
        if "weight_transform.mask" not in pname:
            assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", ZOO)
def test_quantized_model_adds_only_quantizer_state(name):
    """FP32 and FAT variants share one definition: same keys, plus quantizer state in the FAT one."""
    fp32, fat = create_model(name, bits=32).state_dict(), create_model(name, bits=4).state_dict()
    assert set(fp32) <= set(fat)
    extra = set(fat) - set(fp32)
    assert all(any(part in k for part in (*QUANTIZER_CHILDREN, "shortcut_quantizer.")) for k in extra)
    assert all(fp32[k].shape == fat[k].shape for k in fp32)


@pytest.mark.parametrize("name", ZOO)
def test_layer_roles(name):
    """First conv and last linear: 8-bit, no transform; every other conv/linear: FAT at the body bits."""
    model = create_model(name, bits=(3, 5))
    layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    plain = [m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    first, last, body = layers[0], layers[-1], layers[1:-1]
    assert isinstance(first, QuantConv2d) and first.in_channels == 3 and isinstance(last, QuantLinear)
    for edge in (first, last):
        assert edge.weight_quantizer.bits == 8 and isinstance(edge.weight_transform, nn.Identity)
        assert edge.input_quantizer.bits == 8
    for layer in body:
        assert isinstance(layer.weight_transform, FATTransform)
        assert layer.weight_quantizer.bits == 3 and layer.input_quantizer.bits == 5
        # Masks start at 1/C_out (a model-wide weight init must not touch them).
        assert torch.all(layer.weight_transform.mask.weight == 1.0 / layer.weight.shape[0])
        expected_alpha = 8.0 if model_info(name).family == "imagenet" else 5.0
        assert layer.input_quantizer.alpha.item() == expected_alpha
    # Only the nn.Linear masks inside FAT transforms are left as plain torch layers.
    mask_ids = {id(m.weight_transform.mask) for m in body}
    assert all(id(p) in mask_ids for p in plain if isinstance(p, nn.Linear))
    assert not any(isinstance(p, nn.Conv2d) for p in plain)


@pytest.mark.parametrize("name", ZOO)
def test_signed_quantizers_exactly_where_inputs_can_be_negative(name):
    """Every unsigned quantizer only ever sees x >= 0; every signed one does see negative inputs.

    Checked on the data a random model produces, not on the code's own signedness flags.
    """
    model = create_model(name, bits=4).eval()
    seen: dict[str, float] = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, key=key: seen.update({key: args[0].min().item()}))
        for key, module in model.named_modules()
        if isinstance(module, ActivationQuantizer)
    ]
    with torch.no_grad():
        model(small_input(name, batch=4))
    for hook in hooks:
        hook.remove()
    quantizers = dict(model.named_modules())
    assert len(seen) == sum(isinstance(m, ActivationQuantizer) for m in quantizers.values())
    for key, minimum in seen.items():
        if quantizers[key].signed:
            assert minimum < 0, f"{key} is signed but its input is never negative (wastes a bit)"
        else:
            assert minimum >= 0, f"{key} is unsigned but its input reaches {minimum}"


def test_mobilenetv2_signedness_by_position():
    model = create_model("mobilenetv2", bits=4)
    modules = dict(model.named_modules())
    assert not modules["features.1.conv.0.0.input_quantizer"].signed  # first block: input is the stem's ReLU6
    assert modules["features.2.conv.0.0.input_quantizer"].signed  # expansion after a linear bottleneck
    assert not modules["features.2.conv.1.0.input_quantizer"].signed  # depthwise after ReLU6
    assert not modules["features.2.conv.2.input_quantizer"].signed  # projection after ReLU6
    assert modules["features.18.0.input_quantizer"].signed
    assert modules["features.3.branch_quantizer"].signed and modules["features.3.shortcut_quantizer"].signed
    assert "features.2.branch_quantizer" not in modules  # stride 2: no residual
    depthwise = modules["features.2.conv.1.0"]
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == 96
    assert isinstance(depthwise.weight_transform, FATTransform) and depthwise.weight_quantizer.bits == 4


def test_vgg_classifier_sizes():
    small = create_model("vgg_small", bits=4)
    assert small.features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)  # 512 * 4 * 4 = 8192
    assert small.classifier[-1].in_features == 8192 and isinstance(small.classifier[0], nn.Dropout)
    assert small.classifier[0].p == 0.5
    convs = [m for m in small.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 128, 256, 256, 512, 512]
    vgg16 = create_model("vgg16_bn", bits=32)
    assert vgg16.features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 1, 1)
    assert vgg16.classifier[-1].in_features == 512
    assert sum(isinstance(m, nn.Conv2d) for m in vgg16.features) == 13
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg16.features) == 13


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_fp32_model_is_torchvision_architecture(name):
    """Same state-dict keys and shapes as torchvision, and identical outputs with its weights."""
    reference = TORCHVISION[name](num_classes=7).eval()
    model = create_model(name, bits=32, num_classes=7).eval()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    model.load_state_dict(theirs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


class LeafTracer(torch.fx.Tracer):
    """The tracer export folds from: quantized layers, quantizers, conv/linear/BN are leaves."""

    LEAVES = (QuantConv2d, QuantLinear, ActivationQuantizer, nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.LEAVES) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("bits", [32, 4], ids=["fp32", "fat4"])
@pytest.mark.parametrize("name", ZOO)
def test_fx_trace(name, bits):
    model = create_model(name, bits=bits).eval()
    graph_module = torch.fx.GraphModule(model, LeafTracer().trace(model))
    x = small_input(name)
    with torch.no_grad():
        assert torch.equal(graph_module(x), model(x))
    targets = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    called = [t for t in targets if isinstance(model.get_submodule(t), LeafTracer.LEAVES)]
    # Every outermost stateful leaf (quantized layer, residual quantizer, BN...) is exactly one node
    # (stateless modules such as a block's ReLU may be applied twice).
    leaves = [path for path, m in model.named_modules() if isinstance(m, LeafTracer.LEAVES)]
    outermost = [p for p in leaves if not any(p.startswith(f"{q}.") for q in leaves)]
    assert sorted(called) == sorted(outermost)


def test_create_model_errors():
    with pytest.raises(FatqError, match="unknown architecture"):
        create_model("resnet19")
    with pytest.raises(FatqError, match="no option"):
        create_model("vgg_small", shortcut="B")
