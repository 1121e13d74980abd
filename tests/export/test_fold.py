"""Fold: model -> deploy graph. Integers, folded scales/biases and per-layer outputs against the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from export_helpers import input_shape_for, quantizer_inputs, trained_like
from torch import nn

from engines.deploy_check import float_baseline
from export.deploy_graph import DeployGraph
from export.fold import dequantized, fold
from export.lower import lower
from export.reference import DeployReference, requant_multiplier
from fatq.errors import FatqError
from fatq.layers import QuantConv2d, QuantLinear
from fatq.models import create_model, list_models
from fatq.qconfig import QuantSpec

# Every model at one bit width in the fast suite (signed inputs and depthwise: mobilenetv2;
# max-pool and 1x1 downsample: resnet18; option A: resnet20), every bit width on resnet20;
# the full matrix is marked slow.
FAST_CASES = [
    ("resnet20", 2),
    ("resnet20", 3),
    ("resnet20", 4),
    ("resnet20", 8),
    ("vgg_small", 2),
    ("mobilenetv2", 4),
    ("resnet18", 3),
]
FULL_CASES = [
    pytest.param(name, bits, marks=pytest.mark.slow)
    for name in list_models()
    for bits in (2, 3, 4, 8)
    if (name, bits) not in FAST_CASES
]


def _weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def _check_weights(model: nn.Module, graph: DeployGraph) -> None:
    """Integers identical to layer.weight_integers() (up to the recorded sign flips); scales and
    biases equal the closed-form BN fold computed here in float64."""
    modules = dict(model.named_modules())
    layers = _weighted_layers(model)
    folded = {n.name: n for n in graph.nodes if n.op in ("conv", "linear")}
    assert set(folded) == set(layers)
    for path, layer in layers.items():
        node = folded[path]
        q_model, s_model = layer.weight_integers()
        sign = np.ones(q_model.shape[0])
        sign[node.attrs["negated_channels"]] = -1
        shape = (-1,) + (1,) * (q_model.dim() - 1)
        restored = node.params["weight"].astype(np.float64) * sign.reshape(shape)
        np.testing.assert_array_equal(restored, q_model.double().numpy())
        s_model = np.broadcast_to(s_model.double().reshape(-1).numpy(), (q_model.shape[0],))
        bias = layer.bias.detach().double().numpy() if layer.bias is not None else np.zeros(q_model.shape[0])
        if "batchnorm" in node.attrs:
            bn = modules[node.attrs["batchnorm"]]
            factor = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).detach().numpy()
            expected_scale = s_model * factor
            bias = bn.bias.detach().double().numpy() + (bias - bn.running_mean.double().numpy()) * factor
        else:
            expected_scale = s_model
        assert (node.params["weight_scale"] > 0).all()
        np.testing.assert_allclose(node.params["weight_scale"] * sign, expected_scale, rtol=2e-7)
        np.testing.assert_allclose(node.params["bias"], bias, rtol=1e-6, atol=1e-6 * np.abs(bias).max())
        assert sorted(node.attrs["negated_channels"]) == [int(c) for c in np.flatnonzero(expected_scale < 0)]


def _check_layer_outputs(model: nn.Module, graph: DeployGraph, x: torch.Tensor) -> None:
    """Each folded conv/linear, fed the model's own quantized input, reproduces the model's BN output."""
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for node in graph.nodes:
        if node.op not in ("conv", "linear"):
            continue
        layer = modules[node.name]
        hooks.append(
            layer.register_forward_hook(
                lambda m, args, out, n=node.name: captured.update({n + ":in": m.input_quantizer(args[0])})
            )
        )
        target = modules.get(node.attrs.get("batchnorm"), layer)
        hooks.append(target.register_forward_hook(lambda m, args, out, n=node.name: captured.update({n + ":out": out})))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for node in graph.nodes:
        if node.op not in ("conv", "linear"):
            continue
        shape = (-1,) + (1,) * (node.params["weight"].ndim - 1)
        weight = torch.from_numpy(node.params["weight"].astype(np.float32) * node.params["weight_scale"].reshape(shape))
        bias = torch.from_numpy(node.params["bias"])
        inp, out = captured[node.name + ":in"], captured[node.name + ":out"]
        if node.op == "conv":
            a = node.attrs
            mine = F.conv2d(inp, weight, bias, a["stride"], a["padding"], a["dilation"], a["groups"])
        else:
            mine = F.linear(inp, weight, bias)
        torch.testing.assert_close(mine, out, rtol=1e-4, atol=1e-4 * float(out.abs().max()), msg=node.name)


def _check_integer_reference(model: nn.Module, graph: DeployGraph, x: torch.Tensor) -> None:
    """Layer by layer (every quantized tensor of the model fed back in), the integer reference
    differs from the model's integers by no more than the int32 bias rounding allows.

    The model adds a float bias; the engine adds round(bias / (s_x s_w)) to the accumulator, an
    error of at most M/2 output levels with M = s_x s_w / s_y, so |q_ref - q_model| <= M/2 + 1.
    Quantizers of float tensors (Add, pooling) must agree exactly but for rare float ties, unless
    a float-output integer layer (whose bias is rounded the same way) feeds them.
    """
    integers = {n: q.integers(read)[0] for n, (q, read) in quantizer_inputs(model, x).items()}
    lowered = lower(graph)
    producers = lowered.producers()
    # integer layers store their outputs widened by ``expand`` (export.lower): same real values
    expand = {name: producers[name].attrs["out_quant"].get("expand", 1) for name in integers}
    reference = DeployReference(lowered)
    _, captured = reference.run(x, capture=True, overrides={n: q * expand[n] for n, q in integers.items()})
    assert set(integers) <= set(captured)
    for name, theirs in integers.items():
        diff = (captured[name] / expand[name] - theirs).abs()
        node = producers[name]
        while node.op not in ("qconv", "qlinear", "quantize"):  # max-pool/flatten after a fused conv
            node = producers[node.inputs[0]]
        if node.op == "quantize":
            assert float(diff.max()) <= 1, name
            if not _reads_float_integer_layer(lowered, node):
                assert float((diff > 0).float().mean()) <= 1e-3, name
        else:
            multiplier = requant_multiplier(
                node.attrs["input_scale"], node.params["weight_scale"], node.attrs["out_quant"]["scale"]
            )
            assert float(diff.max()) <= np.floor(multiplier.max() / 2) + 1, name


def _reads_float_integer_layer(graph: DeployGraph, node) -> bool:
    """Whether a qconv/qlinear with a float output feeds ``node`` through float ops."""
    producers, pending = graph.producers(), list(node.inputs)
    while pending:
        producer = producers.get(pending.pop())
        if producer is None or producer.attrs.get("out_quant") is not None:
            continue
        if producer.op in ("qconv", "qlinear"):
            return True
        pending += producer.inputs
    return False


@pytest.mark.parametrize(("name", "bits"), FAST_CASES + FULL_CASES)
def test_fold_matches_model(name, bits):
    model = trained_like(name, bits)
    shape = input_shape_for(name)
    graph = fold(model, shape)
    assert graph.quantized and graph.dialect == "folded"
    _check_weights(model, graph)
    x = torch.randn(4, *shape)
    _check_layer_outputs(model, graph, x)
    _check_integer_reference(model, graph, x)


def test_fold_shortcut_b_and_unsigned_residuals():
    model = trained_like("resnet20", 4, shortcut="B")
    graph = fold(model)
    assert "subsample_pad" not in graph.ops()
    _check_weights(model, graph)
    x = torch.randn(4, 3, 32, 32)
    _check_layer_outputs(model, graph, x)
    _check_integer_reference(model, graph, x)


@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "mobilenetv2", "resnet18"])
def test_fp32_model_folds_to_float_graph(name):
    model = trained_like(name, 32)
    shape = input_shape_for(name)
    graph = fold(model, shape)
    assert not graph.quantized and "quantize" not in graph.ops()
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(DeployReference(graph)(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_dequantized_graph_is_the_float_baseline():
    model = trained_like("resnet20", 4)
    graph = dequantized(fold(model))
    assert not graph.quantized and "quantize" not in graph.ops()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = float_baseline(model)(x)
    torch.testing.assert_close(DeployReference(graph)(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_negative_and_zero_gamma_keep_scales_positive():
    model = trained_like("resnet20", 4)
    model.bn1.weight.data[:4] = torch.tensor([-1.0, 0.0, 2.0, -0.5])
    node = fold(model).node("conv1")
    assert (node.params["weight_scale"] > 0).all()
    assert node.attrs["negated_channels"][:2] == [0, 3]
    assert not node.params["weight"][1].any()  # gamma 0: the channel is its bias


def test_unknown_op_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.GELU()

        def forward(self, x):
            return self.act(self.conv(x)).sum(dim=(2, 3))

    with pytest.raises(FatqError, match="act"):
        fold(Odd(), [3, 8, 8])


def test_power_of_two_weights_beyond_int8_are_refused():
    spec = QuantSpec(weight_bits=5, act_bits=5, power_of_two=True)
    model = create_model("resnet20", spec=spec).eval()
    with pytest.raises(FatqError, match="int8"):
        fold(model)


def test_disabled_quantizer_is_named_unless_skipped():
    model = create_model("resnet20", spec=QuantSpec(weight_bits=4, act_bits=4, edge_inputs="float")).eval()
    with pytest.raises(FatqError, match="conv1.input_quantizer"):
        fold(model)
    graph = fold(model, disabled_quantizers="skip")
    assert "conv1.input_quantizer" not in {n.name for n in graph.nodes}


def test_deploy_graph_round_trips(tmp_path):
    graph = lower(fold(trained_like("resnet20", 3)))
    graph.meta["note"] = {"nested": [1, 2.5]}
    path = tmp_path / "g.deploy.npz"
    graph.save(path)
    loaded = DeployGraph.load(path)
    assert loaded.to_json() == graph.to_json()
    for a, b in zip(graph.nodes, loaded.nodes, strict=True):
        assert a.params.keys() == b.params.keys()
        for key in a.params:
            np.testing.assert_array_equal(a.params[key], b.params[key])
            assert a.params[key].dtype == b.params[key].dtype
    with pytest.raises(FatqError):
        DeployGraph.load(tmp_path / "missing.npz")


def test_lowering_duplicates_the_stem_and_pads_it_to_four_channels():
    graph = lower(fold(trained_like("resnet20", 4)))
    pads = [n for n in graph.nodes if n.op == "pad_channels"]
    assert len(pads) == 1 and pads[0].inputs == ["conv1.input_quantizer"] and pads[0].attrs["pad"] == 1
    stems = [n for n in graph.nodes if n.op == "qconv" and n.attrs["source"] == "conv1"]
    # the stem feeds two quantizers (layer1.0's conv input and its shortcut): one copy each
    assert sorted(n.attrs["quantizer"] for n in stems) == [
        "layer1.0.conv1.input_quantizer",
        "layer1.0.shortcut_quantizer",
    ]
    for stem in stems:
        assert stem.inputs == [pads[0].output]
        assert stem.params["weight"].shape[1] == 4 and not stem.params["weight"][:, 3].any()
    assert "relu" not in {n.op for n in graph.nodes if n.name.startswith("layer1.0")}  # ReLUs became ranges


def test_widening_keeps_real_values_and_refines_the_bias_grid():
    folded = fold(trained_like("resnet20", 4))
    narrow, wide = lower(folded, weight_limit=1), lower(folded)
    sources = {n.name: n for n in folded.nodes}
    for node in (n for n in wide.nodes if n.op in ("qconv", "qlinear")):
        source = sources[node.attrs["source"]]
        k = np.asarray(node.attrs["weight_expand"])
        weight = node.params["weight"].astype(np.int32)
        original = source.params["weight"].astype(np.int32)
        if weight.shape != original.shape:  # the stem's zero input channel
            weight = weight[:, : original.shape[1]]
        np.testing.assert_array_equal(weight, original * k.reshape(-1, *([1] * (weight.ndim - 1))))
        assert np.abs(weight).max() <= max(63, np.abs(original).max())  # 8-bit layers keep k = 1
        np.testing.assert_allclose(node.params["weight_scale"] * k, source.params["weight_scale"], rtol=1e-6)
        grid = np.float64(node.attrs["input_scale"]) * node.params["weight_scale"]
        assert (np.abs(node.params["bias_int32"] * grid - source.params["bias"]) <= grid / 2 * 1.001 + 1e-12).all()
    expands = {n.attrs["quantizer"]: n.attrs["out_quant"]["expand"] for n in wide.nodes if n.op == "qconv"}
    assert expands["layer1.0.conv2.input_quantizer"] == 127 // 15  # read by conv2 only
    assert expands["layer1.0.branch_quantizer"] == 1  # read by the (float) residual Add
    grids = []
    for graph in (narrow, wide):
        conv2 = graph.node("layer1.0.conv2>layer1.0.branch_quantizer")
        grids.append(np.float64(conv2.attrs["input_scale"]) * conv2.params["weight_scale"])
    # weight_limit=1 keeps the integers: k >= 9 (63 // 7 for 4-bit weights) refines each channel's grid
    assert (grids[0] / grids[1]).min() >= 9 * (1 - 1e-6)
    # and conv2 reads its input widened by j = 8: scale s / 8
    quantizer = folded.node("layer1.0.conv2.input_quantizer").attrs["scale"]
    conv2 = wide.node("layer1.0.conv2>layer1.0.branch_quantizer")
    assert conv2.attrs["input_scale"] == float(np.float32(quantizer) / np.float32(8))
