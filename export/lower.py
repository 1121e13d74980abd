"""Lower a folded quantized graph to the integer ops an engine runs (the "integer" dialect).

Each activation quantizer that (through ReLU, ReLU6/Clip, MaxPool or Flatten only) reads the
output of a conv or linear is fused with it into one ``qconv`` / ``qlinear`` whose output is
already that quantizer's integers. This is exact, not an approximation: rounding is monotone, so
clamp(round(relu(y) / s), qmin, qmax) = clamp(round(y / s), max(qmin, 0), qmax); a clip to
[a, b] likewise narrows the integer range to [round(a / s), round(b / s)]; and max-pooling and
flattening commute with any monotone elementwise map. A conv feeding several quantizers (the
stem of a ResNet feeds the first block's conv and its shortcut quantizer) is duplicated, one
copy per quantizer, so every conv keeps a single quantized output — the form integer engines
fuse into one kernel.

``qconv`` / ``qlinear`` nodes: params ``weight`` int8, ``weight_scale`` float32 [C_out],
``bias`` float32 [C_out] and ``bias_int32`` int32 [C_out] = round_half_even(bias / (s_x · s_w,c))
(with s_x · s_w,c in float32: the scale engines use for an int32 bias); attrs as the folded conv
plus ``input_scale`` (s_x), ``out_quant`` {scale, qmin, qmax} or None for a float output (the
logits), ``source`` (the folded conv) and ``quantizer`` (the fused quantizer).

Quantizers reading anything else (the image, a residual Add, the pooled features) stay
``quantize`` nodes; MaxPool/Flatten/SubsamplePad of a quantized tensor keep its quantization.

A (non-grouped) conv whose input channels are not a multiple of 4 — the stem, reading a 3-channel
image — gets a ``pad_channels`` node adding zero channels and zero weights for them: exact, and
ONNX Runtime's int8 conv kernels need it (its stem with 3 channels ran 4.5x slower than with 4).
"""

from __future__ import annotations

import numpy as np

from export.deploy_graph import INTEGER_PRESERVING_OPS, DeployGraph, DeployNode, tensor_quant
from fatq.errors import FatqError

INT32_MAX = 2**31 - 1
# Ops between a conv and a quantizer that fuse into the quantizer's integer range or commute with it.
_RANGE_OPS = frozenset({"relu", "clip"})
_PASS_THROUGH_OPS = frozenset({"maxpool", "flatten"})
CHANNEL_MULTIPLE = 4
ACTIVATION_LIMIT = 127  # int8
DEFAULT_WEIGHT_LIMIT = 63  # see lower(): u8 x s8 pairs stay within int16 on CPUs without VNNI


def _round_half_even(value: np.float32) -> int:
    return int(np.round(value))


def _narrow_range(quant: dict, chain: list[DeployNode]) -> tuple[int, int]:
    """Integer range of quantize(chain(y)) expressed on y: relu and clip narrow [qmin, qmax]."""
    qmin, qmax = quant["qmin"], quant["qmax"]
    scale = np.float32(quant["scale"])
    for node in chain:
        if node.op == "relu":
            qmin = max(qmin, 0)
        elif node.op == "clip":
            # the model computes round(fl32(bound) / s) for a clipped value: same float32 division
            qmin = max(qmin, _round_half_even(np.float32(node.attrs["min"]) / scale))
            qmax = min(qmax, _round_half_even(np.float32(node.attrs["max"]) / scale))
    if qmin > qmax:
        raise FatqError(f"the range of {chain[-1].name!r} is empty at scale {quant['scale']}; cannot quantize it.")
    return qmin, qmax


def _integer_params(node: DeployNode, input_scale: float) -> dict:
    """weight/scales/bias of a quantized conv or linear, plus the int32 bias at scale s_x · s_w."""
    params = node.params
    bias_scale = np.float32(input_scale) * params["weight_scale"].astype(np.float32)  # float32 product
    bias_int = np.round(params["bias"].astype(np.float64) / bias_scale.astype(np.float64))
    if np.abs(bias_int).max(initial=0) > INT32_MAX:
        raise FatqError(f"{node.name}: the bias does not fit int32 at scale input·weight scale; cannot export it.")
    return {**params, "bias_int32": bias_int.astype(np.int32)}


class _Lowering:
    def __init__(self, graph: DeployGraph):
        self.graph = graph
        self.producers = graph.producers()
        self.nodes: list[DeployNode] = []
        self.quant: dict[str, dict] = {}  # lowered tensor -> {scale, qmin, qmax}

    def emit(self, node: DeployNode) -> None:
        if node.attrs.get("out_quant") is not None:
            self.quant[node.output] = node.attrs["out_quant"]
        self.nodes.append(node)

    def source_chain(self, quantizer: DeployNode) -> tuple[DeployNode | None, list[DeployNode]]:
        """The quantized conv/linear feeding ``quantizer`` through range/pass-through ops, and those ops."""
        chain: list[DeployNode] = []
        tensor = quantizer.inputs[0]
        while tensor in self.producers:
            producer = self.producers[tensor]
            if producer.op in ("conv", "linear") and producer.attrs.get("quantized"):
                return producer, list(reversed(chain))
            if producer.op not in _RANGE_OPS | _PASS_THROUGH_OPS:
                break
            chain.append(producer)
            tensor = producer.inputs[0]
        return None, []

    def standalone_quantize(self, quantizer: DeployNode) -> DeployNode:
        """A quantizer reading a float tensor; a ReLU/clip right before it narrows its range instead."""
        chain, tensor = [], quantizer.inputs[0]
        while tensor in self.producers and self.producers[tensor].op in _RANGE_OPS:
            chain.append(self.producers[tensor])
            tensor = chain[-1].inputs[0]
        qmin, qmax = (
            _narrow_range(quantizer.attrs, chain) if chain else (quantizer.attrs["qmin"], quantizer.attrs["qmax"])
        )
        out_quant = {"scale": quantizer.attrs["scale"], "qmin": qmin, "qmax": qmax}
        return DeployNode(
            quantizer.name, "quantize", [tensor], quantizer.output, {**quantizer.attrs, "out_quant": out_quant}
        )

    def input_scale(self, node: DeployNode) -> float:
        quant = self.quant.get(node.inputs[0])
        if quant is None:
            raise FatqError(f"{node.name} reads the float tensor {node.inputs[0]!r}: its input is not quantized.")
        return quant["scale"]

    def integer_layer(self, node: DeployNode, name: str, output: str, out_quant: dict | None, quantizer: str | None):
        input_scale = self.input_scale(node)
        attrs = {**node.attrs, "input_scale": input_scale, "out_quant": out_quant, "source": node.name}
        attrs["quantizer"] = quantizer
        op = "qconv" if node.op == "conv" else "qlinear"
        return DeployNode(name, op, list(node.inputs), output, attrs, _integer_params(node, input_scale))

    def fused(self, quantizer: DeployNode, source: DeployNode, chain: list[DeployNode]) -> None:
        qmin, qmax = _narrow_range(quantizer.attrs, chain)
        out_quant = {"scale": quantizer.attrs["scale"], "qmin": qmin, "qmax": qmax}
        passes = [n for n in chain if n.op in _PASS_THROUGH_OPS]
        layer_output = quantizer.output if not passes else f"{source.name}>{quantizer.name}"
        self.emit(
            self.integer_layer(source, f"{source.name}>{quantizer.name}", layer_output, out_quant, quantizer.name)
        )
        tensor = layer_output
        for i, op_node in enumerate(passes):
            output = quantizer.output if i == len(passes) - 1 else f"{op_node.name}>{quantizer.name}"
            attrs = {**op_node.attrs, "out_quant": out_quant}
            self.emit(DeployNode(f"{op_node.name}>{quantizer.name}", op_node.op, [tensor], output, attrs))
            tensor = output

    def run(self) -> list[DeployNode]:
        for node in self.graph.nodes:
            if node.op == "quantize":
                source, chain = self.source_chain(node)
                if source is not None:
                    self.fused(node, source, chain)
                else:
                    self.emit(self.standalone_quantize(node))
            elif node.op in ("conv", "linear") and node.attrs.get("quantized"):
                # kept only if something reads its float output (the logits, or a float island)
                self.emit(self.integer_layer(node, node.name, node.output, None, None))
            elif node.op in INTEGER_PRESERVING_OPS and node.inputs[0] in self.quant:
                self.emit(
                    DeployNode(
                        node.name,
                        node.op,
                        node.inputs,
                        node.output,
                        {**node.attrs, "out_quant": self.quant[node.inputs[0]]},
                    )
                )
            else:
                self.emit(DeployNode(node.name, node.op, node.inputs, node.output, dict(node.attrs), dict(node.params)))
        return _pad_input_channels(_live_nodes(self.nodes, self.graph.output_name))


def _integer_only(nodes: list[DeployNode]) -> set[str]:
    """Quantized tensors read only by integer layers (directly or through integer-preserving ops)."""
    readers: dict[str, list[DeployNode]] = {}
    for node in nodes:
        for tensor in node.inputs:
            readers.setdefault(tensor, []).append(node)
    memo: dict[str, bool] = {}

    def only_integer(tensor: str) -> bool:
        if tensor not in memo:
            found = readers.get(tensor, [])
            memo[tensor] = bool(found) and all(
                r.op in ("qconv", "qlinear") or (r.op in INTEGER_PRESERVING_OPS and only_integer(r.output))
                for r in found
            )
        return memo[tensor]

    return {n.output for n in nodes if n.attrs.get("out_quant") is not None and only_integer(n.output)}


def _widen(nodes: list[DeployNode], weight_limit: int, widen_activations: bool) -> list[DeployNode]:
    """Store integers on finer grids so the int32 bias loses (almost) nothing (see :func:`lower`)."""
    integer_only = _integer_only(nodes) if widen_activations else set()
    quant: dict[str, dict] = {}
    result = []
    for node in nodes:
        attrs, params = dict(node.attrs), dict(node.params)
        if node.op in ("qconv", "qlinear") and attrs["out_quant"] is not None:
            out = attrs["out_quant"]
            expand = (
                max(1, ACTIVATION_LIMIT // max(abs(out["qmin"]), abs(out["qmax"]), 1))
                if node.output in integer_only
                else 1
            )
            attrs["out_quant"] = {**out, "expand": expand}
        elif node.op in INTEGER_PRESERVING_OPS and node.inputs[0] in quant:
            attrs["out_quant"] = quant[node.inputs[0]]
        if node.op in ("qconv", "qlinear"):
            peak = np.abs(params["weight"].astype(np.int32)).reshape(params["weight"].shape[0], -1).max(axis=1)
            expand_w = np.maximum(1, weight_limit // np.maximum(peak, 1)).astype(np.int32)
            shape = (-1,) + (1,) * (params["weight"].ndim - 1)
            params["weight"] = (params["weight"].astype(np.int32) * expand_w.reshape(shape)).astype(np.int8)
            params["weight_scale"] = (params["weight_scale"] / expand_w.astype(np.float32)).astype(np.float32)
            attrs["weight_expand"] = [int(k) for k in expand_w]
            attrs["input_scale"] = tensor_quant(quant[node.inputs[0]])["scale"]
            params = _integer_params(
                DeployNode(node.name, node.op, node.inputs, node.output, attrs, params), attrs["input_scale"]
            )
        if attrs.get("out_quant") is not None:
            quant[node.output] = attrs["out_quant"]
        result.append(DeployNode(node.name, node.op, list(node.inputs), node.output, attrs, params))
    return result


def _pad_input_channels(nodes: list[DeployNode]) -> list[DeployNode]:
    """Give every non-grouped qconv a multiple of 4 input channels (zero channels, zero weights)."""
    padded: dict[str, str] = {}  # input tensor -> its padded version
    result = []
    for node in nodes:
        channels = node.params["weight"].shape[1] if node.op == "qconv" else 0
        if node.op == "qconv" and node.attrs["groups"] == 1 and channels % CHANNEL_MULTIPLE:
            pad = CHANNEL_MULTIPLE - channels % CHANNEL_MULTIPLE
            source = node.inputs[0]
            if source not in padded:
                quant = next(n.attrs["out_quant"] for n in result if n.output == source)
                padded[source] = f"{source}>pad{channels + pad}"
                result.append(
                    DeployNode(
                        padded[source], "pad_channels", [source], padded[source], {"pad": pad, "out_quant": quant}
                    )
                )
            weight = np.pad(node.params["weight"], ((0, 0), (0, pad), (0, 0), (0, 0)))
            node = DeployNode(
                node.name, node.op, [padded[source]], node.output, node.attrs, {**node.params, "weight": weight}
            )
        result.append(node)
    return result


def _live_nodes(nodes: list[DeployNode], output: str) -> list[DeployNode]:
    """Drop nodes nothing needs (the float convs and ReLUs that fused copies replaced)."""
    needed = {output}
    live = []
    for node in reversed(nodes):
        if node.output in needed:
            live.append(node)
            needed.update(node.inputs)
    return list(reversed(live))


def lower(graph: DeployGraph, weight_limit: int = DEFAULT_WEIGHT_LIMIT) -> DeployGraph:
    """The integer-dialect graph of a folded quantized graph (see the module docstring).

    Integer grids are widened where that is free and exact, because an engine adds the bias as
    round(bias / (s_x s_w)) on the accumulator's grid: a 4-bit x 4-bit conv feeding an 8-bit
    quantizer has an accumulator step of up to half an output level, and rounding the folded
    BN bias to it changed ~5 % of that quantizer's integers (by one) in a trained ResNet-20
    W4A4 and top-1 on ~6 % of test images. Widening multiplies the integers and divides the
    scales, leaving every real value unchanged:

    - weights: each output channel's integers times k = weight_limit // max|q| (scale / k);
    - a fused conv's output read only by integer layers: its integers times
      j = 127 // max(|qmin|, |qmax|) at scale s / j (the DequantizeLinear -> Clip -> Q after the
      conv requantizes to it exactly; the conv itself still rounds at s, as the model does).
      Not for a model trained with ``target="cpu"`` (``meta["spec"]``): there the ``onnx-ort`` file
      would spend a uint8 ``Mul`` pass on every widened tensor, and the finer bias step kept
      little of the model as trained (``--target cpu`` W4A4 models, 10,000 test images, ONNX Runtime
      on the file against the model as trained without / with it: ResNet-20 96.10 / 96.14 %, 1-2 %
      faster at batch 64 and 4 % at batch 1; MobileNetV2 75.11 / 76.73 %, 10-14 % faster).

    The bias step shrinks by j_in * k (72x for 4-bit weights and activations). ``weight_limit``
    is 63 by default so that a uint8 x int8 pair sums within int16 (2 * 255 * 63 < 2^15): CPUs
    without VNNI multiply with saturating 16-bit pairs (ONNX Runtime's AVX2 u8s8 kernels); 127
    is exact on VNNI CPUs, TensorRT and OpenVINO's VNNI kernels. 1 disables weight widening.
    """
    if graph.dialect != "folded" or not graph.quantized:
        raise FatqError("only a folded graph of a quantized model can be lowered to integer ops.")
    if not 1 <= weight_limit <= 127:
        raise FatqError(f"weight_limit must be in 1..127, got {weight_limit}.")
    widen_activations = graph.meta.get("spec", {}).get("target") != "cpu"
    nodes = _widen(_Lowering(graph).run(), weight_limit, widen_activations)
    lowered = DeployGraph(
        nodes=nodes,
        input_name=graph.input_name,
        input_shape=list(graph.input_shape),
        output_name=graph.output_name,
        dialect="integer",
        quantized=True,
        meta=dict(graph.meta),
    )
    lowered.validate()
    return lowered
