"""DeployReference: a small torch module that runs a deploy graph with an integer engine's semantics.

Integer graphs (:func:`export.lower.lower`) run exactly as ONNX Runtime's CPU kernels do:

- ``quantize``: q = clamp(round_half_even(x / s), qmin, qmax), float32 division (MLAS divides).
- ``qconv`` / ``qlinear``: acc = Σ q_x · q_w computed exactly, plus the int32 bias; then, as
  ORT's QLinearConv requantizes, q_y = clamp(round_half_even(float32(acc + bias) · M_c), qmin, qmax)
  with M_c = float32(float32(s_x · s_w,c) / s_y) — the multiplier ORT computes in
  ``ComputeOutputScale`` (qlinearconv.cc) and applies in ``MlasRequantizeOutput`` / the symmetric
  conv kernels; stored as q_y · expand (:func:`export.deploy_graph.tensor_quant`). A float output
  (the logits) is float32(acc + bias) · float32(s_x · s_w,c).
- ``add``, ``relu``, ``clip``, ``global_avgpool``: float32 on dequantized values q · s.
- ``maxpool``, ``flatten``, ``subsample_pad``, ``pad_channels`` of a quantized tensor act on its integers.

Float biases (``bias_arithmetic="float"``, the files for TensorRT and OpenVINO, whose int8 convs
dequantize the accumulator and add the bias in float; :data:`export.formats.FORMATS`):
``qconv`` / ``qlinear`` compute y = float32(acc) · float32(s_x · s_w,c) + b in float32 with the
layer's folded float bias b (never rounded to int32), then the output quantizer as ``quantize``
does: q_y = clamp(round_half_even(y / s_y), qmin, qmax). Engines order these float32 operations
differently (TensorRT folds 1/s_y into its epilogue); :mod:`export.engine_exact` moves the biases
so that no value y / s_y the accumulator can reach lies within their float error of a rounding
boundary, except in channels with too many reachable values to clear (counted in the export report).

In a float-bias file an int32 engine (ONNX Runtime) derives the int32 biases itself, in float32
(:func:`ort_int32_bias`), and only for layers it fuses before a QuantizeLinear; a layer with a float output
(the classifier, a ``--target trt`` branch conv) it runs as a float conv/Gemm, so the int32-mode reference
gives those layers the float bias too.

Folded float graphs (FP32 models, :func:`export.fold.dequantized`) run as plain float32 convs.

Exactness of the integer sums: a float32 conv of integer-valued tensors is exact while every
partial sum stays below 2^24, which holds when C_in/groups · k_h · k_w · max|q_x| · max|q_w| < 2^24
(all of ResNet-20's layers, for instance); other layers run in float64. Run it on the CPU (on
CUDA, TF32 would make the float32 sums inexact; it is switched off for the call).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.deploy_graph import (
    BIAS_ARITHMETICS,
    INTEGER_PRESERVING_OPS,
    DeployGraph,
    DeployNode,
    bias_arithmetic,
    tensor_quant,
)
from fatq.errors import FatqError

EXACT_FLOAT32_LIMIT = 2**24


def _buffer(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def ort_int32_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    """The int32 bias ONNX Runtime derives from a float bias (a file with float biases): Round(b / (s_x · s_w,c))
    computed in float32, round half to even (onnxruntime's ``WeightBiasQuantization``, which inserts Mul, Div,
    Round and Cast nodes and folds them). The export's own ``bias_int32`` divides in float64; the two differ
    where the quotient is within float32 error of k + 1/2 (measured: one channel of a 150-step ResNet-20 W4A4,
    b / (s_x · s_w) = -13193.49965 in float64, -13193.5 in float32). Float64 [C_out]."""
    scale = np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)
    return np.round(np.asarray(bias, dtype=np.float32) / scale).astype(np.float64)


def requant_multiplier(input_scale: float, weight_scale: np.ndarray, output_scale: float) -> np.ndarray:
    """float32(float32(s_x · s_w,c) / s_y), per output channel, as ONNX Runtime computes it."""
    return (np.float32(input_scale) * weight_scale.astype(np.float32)) / np.float32(output_scale)


class DeployReference(nn.Module):
    """Runs a :class:`DeployGraph` (integer or folded float dialect).

    Args:
        graph: the graph to run.
        arithmetic: "int32" or "float" biases (module docstring); None: :func:`bias_arithmetic`.

    ``forward(x)``: x float32 [N, C, H, W] (normalized image) -> logits float32 [N, classes].
    :meth:`run` also returns every quantized tensor's integers.
    """

    def __init__(self, graph: DeployGraph, arithmetic: str | None = None):
        super().__init__()
        self.graph = graph
        self.arithmetic = arithmetic or bias_arithmetic(graph)
        if self.arithmetic not in BIAS_ARITHMETICS:
            raise FatqError(f"bias arithmetic must be one of {BIAS_ARITHMETICS}, got {self.arithmetic!r}.")
        # how each quantized tensor is stored (integers, scale): what DequantizeLinear reads
        self.quant = {n.output: tensor_quant(n.attrs["out_quant"]) for n in graph.nodes if n.attrs.get("out_quant")}
        self.float_bias_nodes: set[str] = set()  # integer layers that add a float bias (filled below)
        self._pre_rounding: dict[str, Tensor] | None = None  # set during run(pre_rounding=...)
        for index, node in enumerate(graph.nodes):
            for key, value in self._node_buffers(node).items():
                self.register_buffer(f"n{index}_{key}", value, persistent=False)
        self.eval()

    def _node_buffers(self, node: DeployNode) -> dict[str, Tensor]:
        if node.op in ("qconv", "qlinear"):
            params, attrs = node.params, node.attrs
            in_quant = self.quant.get(node.inputs[0])
            if in_quant is None:
                raise FatqError(f"{node.name} reads a float tensor; an integer layer needs a quantized input.")
            weight = params["weight"].astype(np.float64)
            fan_in = int(np.prod(weight.shape[1:]))
            bound = fan_in * max(abs(in_quant["qmin"]), abs(in_quant["qmax"])) * float(np.abs(weight).max(initial=0))
            dtype = torch.float32 if bound < EXACT_FLOAT32_LIMIT else torch.float64
            bias_int32 = params["bias_int32"]
            if self.arithmetic == "int32" and bias_arithmetic(self.graph) == "float":
                bias_int32 = ort_int32_bias(params["bias"], attrs["input_scale"], params["weight_scale"])
            buffers = {"weight": _buffer(weight, dtype), "bias": _buffer(bias_int32, torch.float64)}
            # a layer with a float output in a float-bias file stays a float conv/Gemm on dequantized inputs
            # in an int32 engine too (ONNX Runtime fuses into QLinearConv only before a QuantizeLinear), so it
            # adds the file's float bias
            if self.arithmetic == "float" or (attrs["out_quant"] is None and bias_arithmetic(self.graph) == "float"):
                self.float_bias_nodes.add(node.name)
                buffers["bias"] = _buffer(params["bias"].astype(np.float32), torch.float32)
                buffers["scale"] = _buffer(np.float32(attrs["input_scale"]) * params["weight_scale"], torch.float32)
                if attrs["out_quant"] is not None:
                    buffers["out_scale"] = _buffer(np.float32(attrs["out_quant"]["scale"]), torch.float32)
                return buffers
            if attrs["out_quant"] is not None:
                multiplier = requant_multiplier(
                    attrs["input_scale"], params["weight_scale"], attrs["out_quant"]["scale"]
                )
                buffers["scale"] = _buffer(multiplier, torch.float32)
            else:
                buffers["scale"] = _buffer(np.float32(attrs["input_scale"]) * params["weight_scale"], torch.float32)
            return buffers
        if node.op in ("conv", "linear"):
            if node.attrs.get("quantized"):
                raise FatqError(f"{node.name} is a quantized layer of a folded graph; lower the graph first.")
            return {
                "weight": _buffer(node.params["weight"], torch.float32),
                "bias": _buffer(node.params["bias"], torch.float32),
            }
        return {}

    def _param(self, index: int, key: str) -> Tensor:
        return getattr(self, f"n{index}_{key}")

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)[0]

    def run(
        self,
        x: Tensor,
        capture: bool = False,
        overrides: dict[str, Tensor] | None = None,
        pre_rounding: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the graph.

        Args:
            x: float32 [N, C, H, W].
            capture: also return the integers of every quantized tensor (as computed).
            overrides: {tensor name: value} to use instead of what a node computed (integers for
                quantized tensors): feeding another model's tensors makes every node's captured
                output depend on that model's inputs only, for layer-by-layer parity.
            pre_rounding: filled with {tensor name: t} for every node that rounds: the value in
                output levels before rounding (y / s_y, or the requantized accumulator), float32,
                the tensor's shape (before any ``expand``).

        Returns:
            (logits float32 [N, classes], {tensor name: integers as float32} if ``capture``).
        """
        tf32 = torch.backends.cudnn.flags(allow_tf32=False) if x.is_cuda else contextlib.nullcontext()
        env: dict[str, Tensor] = {self.graph.input_name: x.float()}
        captured: dict[str, Tensor] = {}
        self._pre_rounding = pre_rounding
        try:
            with torch.no_grad(), tf32:
                for index, node in enumerate(self.graph.nodes):
                    env[node.output] = self._run_node(index, node, env)
                    if capture and node.output in self.quant:
                        captured[node.output] = env[node.output]
                    if overrides and node.output in overrides:
                        env[node.output] = overrides[node.output].to(env[node.output].dtype)
        finally:
            self._pre_rounding = None
        return self._float(self.graph.output_name, env), captured

    def _round(self, node: DeployNode, t: Tensor) -> Tensor:
        """round_half_even(t), recording t for :meth:`run`'s ``pre_rounding``."""
        if self._pre_rounding is not None:
            self._pre_rounding[node.output] = t
        return torch.round(t)

    def _float(self, name: str, env: dict[str, Tensor]) -> Tensor:
        """A tensor's real values: integers · scale for quantized tensors (DequantizeLinear)."""
        value = env[name]
        quant = self.quant.get(name)
        return value if quant is None else value * torch.tensor(quant["scale"], dtype=torch.float32)

    def _run_node(self, index: int, node: DeployNode, env: dict[str, Tensor]) -> Tensor:
        op, attrs = node.op, node.attrs
        if op in ("qconv", "qlinear"):
            return self._integer_layer(index, node, env[node.inputs[0]])
        if op in INTEGER_PRESERVING_OPS and node.inputs[0] in self.quant:
            return _float_op(op, attrs, env[node.inputs[0]])  # exact on integers
        if op == "quantize":
            q = self._round(node, env[node.inputs[0]] / torch.tensor(attrs["scale"], dtype=torch.float32))
            return q.clamp_(attrs["qmin"], attrs["qmax"])
        if op == "conv":
            weight, bias = self._param(index, "weight"), self._param(index, "bias")
            x = self._float(node.inputs[0], env)
            return F.conv2d(x, weight, bias, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"])
        if op == "linear":
            return F.linear(self._float(node.inputs[0], env), self._param(index, "weight"), self._param(index, "bias"))
        if op == "add":
            return self._float(node.inputs[0], env) + self._float(node.inputs[1], env)
        return _float_op(op, attrs, self._float(node.inputs[0], env))

    def _accumulate(self, index: int, node: DeployNode, q_x: Tensor) -> Tensor:
        """The integer layer's accumulator: int8 × int8 sums, exact (float32 or float64 buffers, see
        :meth:`_node_buffers`); [N, C_out, H, W] or [N, C_out]."""
        weight, attrs = self._param(index, "weight"), node.attrs
        q_x = q_x.to(weight.dtype)
        if node.op == "qconv":
            return F.conv2d(q_x, weight, None, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"])
        return F.linear(q_x, weight)

    def _integer_layer(self, index: int, node: DeployNode, q_x: Tensor) -> Tensor:
        bias, scale = self._param(index, "bias"), self._param(index, "scale")
        attrs = node.attrs
        acc = self._accumulate(index, node, q_x)
        shape = (1, -1, 1, 1) if node.op == "qconv" else (1, -1)
        out_quant = attrs["out_quant"]
        if node.name in self.float_bias_nodes:  # float bias (see _node_buffers): dequantized accumulator + bias, then Q
            y = acc.float() * scale.view(shape) + bias.view(shape)
            if out_quant is None:
                return y
            q = self._round(node, y / self._param(index, "out_scale"))
        else:  # int32 accumulator + int32 bias, converted to float32 (round to nearest even, as cvtdq2ps)
            y = (acc.double() + bias.view(shape)).float() * scale.view(shape)
            if out_quant is None:
                return y
            q = self._round(node, y)
        q = q.clamp_(out_quant["qmin"], out_quant["qmax"])
        expand = out_quant.get("expand", 1)
        return q * expand if expand != 1 else q


def _float_op(op: str, attrs: dict, x: Tensor) -> Tensor:
    """The float ops shared by both dialects (inputs already dequantized where needed)."""
    if op == "relu":
        return torch.relu(x)
    if op == "clip":
        return torch.clamp(x, attrs["min"], attrs["max"])
    if op == "maxpool":
        return F.max_pool2d(
            x, attrs["kernel"], attrs["stride"], attrs["padding"], attrs["dilation"], attrs["ceil_mode"]
        )
    if op == "global_avgpool":
        return x.mean(dim=(2, 3), keepdim=True)
    if op == "flatten":
        return torch.flatten(x, 1)
    if op == "subsample_pad":
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, attrs["pad"], attrs["pad"]))
    if op == "pad_channels":
        return F.pad(x, (0, 0, 0, 0, 0, attrs["pad"]))
    raise FatqError(f"the deploy reference cannot run op {op!r}.")
