"""DeployReference: integer semantics against independent numpy implementations of the engine formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.deploy_graph import DeployGraph, DeployNode
from export.reference import EXACT_FLOAT32_LIMIT, DeployReference, ort_int32_bias


def _conv_graph(weight: np.ndarray, weight_scale, bias_int, in_scale, in_range, out_quant, padding=1, groups=1):
    """input -> quantize -> qconv (one layer) as an integer deploy graph."""
    channels = weight.shape[0]
    quantize = DeployNode(
        "q",
        "quantize",
        ["input"],
        "q",
        {
            "scale": in_scale,
            "qmin": in_range[0],
            "qmax": in_range[1],
            "out_quant": {"scale": in_scale, "qmin": in_range[0], "qmax": in_range[1]},
        },
    )
    conv = DeployNode(
        "conv",
        "qconv",
        ["q"],
        "conv",
        {
            "kernel": list(weight.shape[2:]),
            "stride": [1, 1],
            "padding": [padding, padding],
            "dilation": [1, 1],
            "groups": groups,
            "input_scale": in_scale,
            "out_quant": out_quant,
        },
        {
            "weight": weight.astype(np.int8),
            "weight_scale": np.asarray(weight_scale, np.float32).reshape(channels),
            "bias": np.zeros(channels, np.float32),
            "bias_int32": np.asarray(bias_int, np.int32),
        },
    )
    return DeployGraph([quantize, conv], "input", [weight.shape[1] * groups, 6, 6], "conv", dialect="integer")


def _numpy_conv_int(q: np.ndarray, w: np.ndarray, padding: int) -> np.ndarray:
    """Integer conv (stride 1, groups 1) with int64 accumulation, written with explicit windows."""
    n, _, h, width = q.shape
    k = w.shape[2]
    padded = np.pad(q.astype(np.int64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out = np.zeros((n, w.shape[0], h + 2 * padding - k + 1, width + 2 * padding - k + 1), np.int64)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            window = padded[:, :, i : i + k, j : j + k]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", window, w.astype(np.int64))
    return out


def test_qconv_follows_the_onnxruntime_requantization():
    rng = np.random.default_rng(0)
    weight = rng.integers(-7, 8, (5, 3, 3, 3))
    weight_scale = rng.uniform(0.01, 0.05, 5).astype(np.float32)
    bias_int = rng.integers(-300, 300, 5)
    in_scale, out_scale = 0.043, 0.37
    graph = _conv_graph(
        weight, weight_scale, bias_int, in_scale, (-127, 127), {"scale": out_scale, "qmin": 0, "qmax": 15}
    )
    x = torch.from_numpy(rng.normal(0, 2, (2, 3, 6, 6)).astype(np.float32))

    out = DeployReference(graph)(x).numpy()

    q = np.clip(np.round(x.numpy() / np.float32(in_scale)), -127, 127)
    acc = _numpy_conv_int(q, weight, 1) + bias_int.reshape(1, -1, 1, 1)
    multiplier = (np.float32(in_scale) * weight_scale) / np.float32(out_scale)  # QLinearConv's float math
    expected = np.clip(np.round(acc.astype(np.float32) * multiplier.reshape(1, -1, 1, 1)), 0, 15)
    # the graph output is a quantized tensor: the reference returns its real value q * s
    np.testing.assert_array_equal(out, expected.astype(np.float32) * np.float32(out_scale))


def test_qconv_with_float_biases_adds_the_bias_after_the_dequantized_accumulator():
    """The float-bias arithmetic of TensorRT and OpenVINO: float32(acc)·float32(s_x·s_w) + b, then Q(s_y);
    the int32 bias is not used (it is set to a wrong value here to show that)."""
    rng = np.random.default_rng(2)
    weight = rng.integers(-7, 8, (5, 3, 3, 3))
    weight_scale = rng.uniform(0.01, 0.05, 5).astype(np.float32)
    in_scale, out_scale = 0.043, 0.37
    graph = _conv_graph(
        weight, weight_scale, [10**6] * 5, in_scale, (-127, 127), {"scale": out_scale, "qmin": 0, "qmax": 15}
    )
    bias = rng.normal(0, 1.5, 5).astype(np.float32)
    graph.nodes[1].params["bias"] = bias
    graph.meta["bias_arithmetic"] = "float"
    x = torch.from_numpy(rng.normal(0, 2, (2, 3, 6, 6)).astype(np.float32))

    reference = DeployReference(graph)
    out = reference(x).numpy()

    assert reference.arithmetic == "float" and DeployReference(graph, "int32").arithmetic == "int32"
    q = np.clip(np.round(x.numpy() / np.float32(in_scale)), -127, 127)
    step = (np.float32(in_scale) * weight_scale).reshape(1, -1, 1, 1)
    y = _numpy_conv_int(q, weight, 1).astype(np.float32) * step + bias.reshape(1, -1, 1, 1)
    expected = np.clip(np.round(y / np.float32(out_scale)), 0, 15)
    np.testing.assert_array_equal(out, expected.astype(np.float32) * np.float32(out_scale))


@pytest.mark.parametrize("fan_in_channels", [64, 512])
def test_integer_sums_are_exact_on_both_sides_of_the_float32_bound(fan_in_channels):
    """64 channels x 9 x 127 x 127 < 2^24 runs in float32, 512 channels does not and runs in float64;
    both must equal an int64 computation at extreme values."""
    rng = np.random.default_rng(1)
    weight = rng.choice([-127, 127], (2, fan_in_channels, 3, 3))
    graph = _conv_graph(weight, [1.0, 1.0], [0, 0], 1.0, (-127, 127), None)
    q = rng.choice([-127, 127], (1, fan_in_channels, 6, 6)).astype(np.float32)
    reference = DeployReference(graph)
    dtype = reference.n1_weight.dtype
    bound = fan_in_channels * 9 * 127 * 127
    assert dtype == (torch.float32 if bound < EXACT_FLOAT32_LIMIT else torch.float64)

    out = reference(torch.from_numpy(q)).numpy()

    exact = _numpy_conv_int(q, weight, 1)
    # float output: float32(acc) * float32(s_x s_w) with scales 1 -> float32(acc)
    np.testing.assert_array_equal(out, exact.astype(np.float32))


def test_capture_returns_integers_and_overrides_replace_them():
    weight = np.ones((1, 1, 1, 1), np.int64)
    graph = _conv_graph(weight, [1.0], [0], 0.5, (-127, 127), {"scale": 1.0, "qmin": -127, "qmax": 127}, padding=0)
    x = torch.tensor([[[[1.0, 2.26], [-3.0, 100.0]]]])
    logits, captured = DeployReference(graph).run(x, capture=True)
    np.testing.assert_array_equal(captured["q"].numpy(), [[[[2.0, 5.0], [-6.0, 127.0]]]])
    # conv: 1 * q * (0.5 * 1) / 1 = q / 2, rounded half to even
    np.testing.assert_array_equal(captured["conv"].numpy(), [[[[1.0, 2.0], [-3.0, 64.0]]]])
    _, overridden = DeployReference(graph).run(x, capture=True, overrides={"q": torch.full((1, 1, 2, 2), 4.0)})
    np.testing.assert_array_equal(overridden["conv"].numpy(), np.full((1, 1, 2, 2), 2.0))
    assert logits.shape == (1, 1, 2, 2)


def test_onnxruntime_derives_a_float_bias_in_float32():
    # a channel of a 150-step ResNet-20 W4A4 (layer3.1.conv2): b / (s_x * s_w) is -13193.49965 in float64
    # but exactly -13193.5 in float32, which ONNX Runtime's Round (half to even) takes to -13194
    bias, input_scale, weight_scale = -0.9608310461044312, 0.020425476133823395, 0.003565453924238682
    quotient64 = np.float64(np.float32(bias)) / (np.float64(np.float32(input_scale) * np.float32(weight_scale)))
    assert round(quotient64) == -13193
    assert np.float32(bias) / (np.float32(input_scale) * np.float32(weight_scale)) == np.float32(-13193.5)
    assert ort_int32_bias(np.array([bias]), input_scale, np.array([weight_scale])).tolist() == [-13194.0]
    # away from ties both ways agree
    biases = np.random.default_rng(0).normal(0, 1, 1000)
    scales = np.full(1000, 0.003)
    derived = ort_int32_bias(biases, 0.02, scales)
    exact = np.round(biases / (np.float64(np.float32(0.02)) * np.float64(np.float32(0.003))))
    assert (derived != exact).sum() <= 1
