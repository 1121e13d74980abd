"""Fold a trained model into a :class:`~export.deploy_graph.DeployGraph` (plain data, BN folded away).

The model is walked with torch.fx; quantized layers, quantizers, convs, linears, BatchNorms and
the option-A shortcut are kept as leaves, so the graph has one node per deployable operation.
Every integer comes from the code path the fake-quant forward uses: ``layer.weight_integers()``
for weights and ``quantizer.scale`` / ``quantizer.int_range`` for activations, so the exported
integers are by construction the ones the model computed with.

BatchNorm after a conv or linear folds into a per-output-channel scale and a float bias without
touching the integers: s_c = s_w · γ_c / √(var_c + ε), b_c = β_c + (bias_c − μ_c) · γ_c / √(var_c + ε).
A negative s_c negates channel c's integers (engines require positive scales); γ_c = 0 zeroes
the channel (its output is the constant b_c). FP32 models (bits 32) fold into the same graph
with float weights.

The FAT transform's FFT and mask matmul round differently with different torch thread counts,
so a handful of weight integers can differ between runs with different ``torch.set_num_threads``
(1 in 2.4 M in a ResNet-34 layer): fold with the settings the model is evaluated with.
"""

from __future__ import annotations

import copy
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from export.deploy_graph import DeployGraph, DeployNode
from fatq.errors import FatqError
from fatq.layers import QuantConv2d, QuantLinear
from fatq.models.resnet_cifar import SubsamplePad
from fatq.quantizers import ActivationQuantizer

INPUT_NAME = "input"
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_LEAVES = (QuantConv2d, QuantLinear, ActivationQuantizer, nn.Conv2d, nn.Linear, *_BATCHNORMS, SubsamplePad)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_FLATTEN_FUNCTIONS = (torch.flatten,)
_KNOWN = (
    "QuantConv2d, QuantLinear, Conv2d, Linear, BatchNorm (after a conv/linear), ActivationQuantizer, "
    "ReLU, ReLU6, Hardtanh, MaxPool2d, AdaptiveAvgPool2d(1), Flatten, Dropout, Identity, SubsamplePad, add"
)


class DeployTracer(fx.Tracer):
    """fx tracer that keeps deployable layers (and fatq's quantizers) as single call_module nodes."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return isinstance(module, _LEAVES) or super().is_leaf_module(module, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """The fx graph of ``model`` with :class:`DeployTracer`; a model fx cannot trace is a FatqError."""
    try:
        return DeployTracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...) for dynamic code
        raise FatqError(f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}).") from None


def _pair(value) -> list[int]:
    return [int(value), int(value)] if isinstance(value, int) else [int(v) for v in value]


def _finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise FatqError(f"{name} holds NaN or Inf values; the checkpoint is broken.")


class _Folder:
    """State of one fold: fx node -> tensor name, emitted nodes."""

    def __init__(self, model: nn.Module, disabled_quantizers: str):
        self.model = model
        self.disabled_quantizers = disabled_quantizers
        self.modules = dict(model.named_modules())
        self.nodes: list[DeployNode] = []
        self.tensor: dict[str, str] = {}  # fx node name -> deploy tensor name
        self.size_nodes: set[str] = set()  # fx nodes holding x.size(0) (only used by flatten-style reshapes)
        self.users: dict[str, int] = {}
        self.output_name: str | None = None

    # --- helpers ---------------------------------------------------------------------------

    def emit(self, name: str, op: str, inputs: list[str], attrs: dict | None = None, params: dict | None = None):
        node = DeployNode(name, op, inputs, name, attrs or {}, params or {})
        self.nodes.append(node)
        return node

    def unique(self, base: str) -> str:
        taken = {n.name for n in self.nodes}
        if base not in taken:
            return base
        i = 1
        while f"{base}#{i}" in taken:
            i += 1
        return f"{base}#{i}"

    def arg(self, node: fx.Node, value) -> str:
        if not isinstance(value, fx.Node) or value.name not in self.tensor:
            raise FatqError(f"cannot fold node {node.name!r} ({node.format_node()}): an input is not a tensor.")
        return self.tensor[value.name]

    def unknown(self, node: fx.Node, what: str):
        raise FatqError(f"cannot fold {what} at node {node.name!r}; the folder knows {_KNOWN}.")

    # --- layers ----------------------------------------------------------------------------

    def quantize(self, name: str, quantizer: ActivationQuantizer, source: str) -> str:
        if not quantizer.enabled and self.disabled_quantizers == "skip":
            return source
        if not quantizer.enabled:
            raise FatqError(
                f"activation quantizer {name!r} is disabled (the model keeps that input float); "
                "calibrate it with --calib-data DIR to export an integer model."
            )
        _finite(f"{name}.alpha", quantizer.alpha.detach())
        # a quantizer the model calls twice on the same tensor (a block input under target "cpu": conv1
        # and the shortcut) computes one tensor of integers
        same = next((n for n in self.nodes if n.op == "quantize" and n.name == name and n.inputs == [source]), None)
        if same is not None:
            return same.output
        qmin, qmax = quantizer.int_range
        scale = float(np.float32(quantizer.scale.item()))
        if not scale > 0:
            raise FatqError(f"activation quantizer {name!r} has scale {scale}; it must be positive.")
        attrs = {"bits": quantizer.bits, "signed": quantizer.signed, "scale": scale, "qmin": qmin, "qmax": qmax}
        return self.emit(name, "quantize", [source], attrs).output

    def weighted(self, node: fx.Node, path: str, layer: nn.Module) -> None:
        is_conv = isinstance(layer, nn.Conv2d)
        source = self.arg(node, node.args[0])
        _finite(f"{path}.weight", layer.weight.detach())
        if layer.bias is not None:
            _finite(f"{path}.bias", layer.bias.detach())
        out_channels = layer.weight.shape[0]
        attrs: dict = {}
        if is_conv:
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str) or layer.weight.dim() != 4:
                raise FatqError(f"cannot fold {path}: only 2-D convs with numeric zero padding are supported.")
            attrs = {
                "kernel": _pair(layer.kernel_size),
                "stride": _pair(layer.stride),
                "padding": _pair(layer.padding),
                "dilation": _pair(layer.dilation),
                "groups": int(layer.groups),
            }
        bias = layer.bias.detach().double().numpy() if layer.bias is not None else np.zeros(out_channels)
        if isinstance(layer, (QuantConv2d, QuantLinear)):
            source = self.quantize(f"{path}.input_quantizer", layer.input_quantizer, source)
            integers, scale = layer.weight_integers()
            _finite(f"{path} weight integers", integers)
            lo, hi = float(integers.min()), float(integers.max())
            if lo < -127 or hi > 127:
                raise FatqError(
                    f"{path}: weight integers span [{lo:.0f}, {hi:.0f}], beyond int8 [-127, 127] "
                    f"({getattr(layer.weight_quantizer, 'kind', '?')} quantizer, {layer.weight_quantizer.bits} bits); "
                    "it cannot be deployed to an int8 engine."
                )
            scale = np.broadcast_to(scale.detach().double().reshape(-1).numpy(), (out_channels,)).copy()
            attrs.update(
                quantized=True,
                weight_bits=int(layer.weight_quantizer.bits),
                weight_kind=getattr(layer.weight_quantizer, "kind", "uniform"),
                negated_channels=[],
            )
            params = {"weight": integers.numpy().astype(np.int8), "weight_scale": scale, "bias": bias}
        else:
            attrs["quantized"] = False
            params = {"weight": layer.weight.detach().double().numpy(), "bias": bias}
        self.emit(path, "conv" if is_conv else "linear", [source], attrs, params)
        self.tensor[node.name] = path

    def batchnorm(self, node: fx.Node, path: str, bn: nn.Module) -> None:
        """Fold ``bn`` into the conv/linear that produced its input (its only user)."""
        source = node.args[0]
        source_tensor = self.tensor.get(source.name) if isinstance(source, fx.Node) else None
        producer = next((n for n in self.nodes if n.output == source_tensor), None)
        if producer is None or producer.op not in ("conv", "linear") or len(source.users) != 1:
            raise FatqError(f"cannot fold BatchNorm {path!r}: it must directly follow a conv or linear it alone reads.")
        if not bn.track_running_stats or bn.running_mean is None:
            raise FatqError(f"cannot fold BatchNorm {path!r}: it has no running statistics.")
        stats = {k: v.detach().double() for k, v in (("mean", bn.running_mean), ("var", bn.running_var))}
        gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(stats["mean"])
        beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(stats["mean"])
        for name, value in (("running_mean", stats["mean"]), ("running_var", stats["var"]), ("weight", gamma)):
            _finite(f"{path}.{name}", value)
        factor = (gamma / torch.sqrt(stats["var"] + bn.eps)).numpy()  # [C]
        params = producer.params
        params["bias"] = beta.numpy() + (params["bias"] - stats["mean"].numpy()) * factor
        if producer.attrs["quantized"]:
            scale = params["weight_scale"] * factor
            negative, zero = scale < 0, scale == 0
            weight = params["weight"].astype(np.int16)
            weight[negative] = -weight[negative]
            weight[zero] = 0
            scale = np.abs(scale)
            scale[zero] = params["weight_scale"][zero]  # any positive value: the integers are all 0
            params["weight"] = weight.astype(np.int8)
            params["weight_scale"] = scale
            producer.attrs["negated_channels"] = [int(c) for c in np.flatnonzero(negative)]
        else:
            shape = (-1,) + (1,) * (params["weight"].ndim - 1)
            params["weight"] = params["weight"] * factor.reshape(shape)
        producer.attrs["batchnorm"] = path
        self.tensor[node.name] = producer.output

    # --- dispatch --------------------------------------------------------------------------

    def call_module(self, node: fx.Node) -> None:
        path = str(node.target)
        module = self.modules[path]
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            self.weighted(node, path, module)
        elif isinstance(module, _BATCHNORMS):
            self.batchnorm(node, path, module)
        elif isinstance(module, ActivationQuantizer):
            self.tensor[node.name] = self.quantize(path, module, self.arg(node, node.args[0]))
        elif isinstance(module, _IDENTITY_MODULES):
            self.tensor[node.name] = self.arg(node, node.args[0])
        elif isinstance(module, nn.ReLU):
            self.simple(node, "relu", self.unique(path))
        elif isinstance(module, (nn.ReLU6, nn.Hardtanh)):
            bounds = {"min": 0.0, "max": 6.0} if isinstance(module, nn.ReLU6) else {}
            if isinstance(module, nn.Hardtanh):
                bounds = {"min": float(module.min_val), "max": float(module.max_val)}
            self.simple(node, "clip", self.unique(path), bounds)
        elif isinstance(module, nn.MaxPool2d):
            if module.return_indices:
                self.unknown(node, f"MaxPool2d with return_indices ({path})")
            attrs = {
                "kernel": _pair(module.kernel_size),
                "stride": _pair(module.stride if module.stride is not None else module.kernel_size),
                "padding": _pair(module.padding),
                "dilation": _pair(module.dilation),
                "ceil_mode": bool(module.ceil_mode),
            }
            self.simple(node, "maxpool", self.unique(path), attrs)
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            if _pair(module.output_size) != [1, 1]:
                self.unknown(node, f"AdaptiveAvgPool2d({module.output_size}) ({path})")
            self.simple(node, "global_avgpool", self.unique(path))
        elif isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                self.unknown(node, f"Flatten({module.start_dim}, {module.end_dim}) ({path})")
            self.simple(node, "flatten", self.unique(path))
        elif isinstance(module, SubsamplePad):
            self.simple(node, "subsample_pad", self.unique(path), {"pad": int(module.pad)})
        else:
            self.unknown(node, f"module {path!r} ({type(module).__name__})")

    def simple(self, node: fx.Node, op: str, name: str, attrs: dict | None = None, source=None) -> None:
        source = self.arg(node, node.args[0] if source is None else source)
        self.tensor[node.name] = self.emit(name, op, [source], attrs).output

    def add(self, node: fx.Node) -> None:
        if len(node.args) != 2 or node.kwargs:
            self.unknown(node, f"add with arguments {node.args}, {dict(node.kwargs)}")
        inputs = [self.arg(node, a) for a in node.args]
        self.tensor[node.name] = self.emit(self.unique(node.name), "add", inputs).output

    def mean(self, node: fx.Node, args: tuple, kwargs: dict) -> None:
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if sorted(d % 4 for d in dims) != [2, 3]:
            self.unknown(node, f"mean over dims {dims}")
        pooled = self.emit(self.unique(node.name), "global_avgpool", [self.arg(node, args[0])]).output
        if not keepdim:
            pooled = self.emit(self.unique(f"{node.name}.flatten"), "flatten", [pooled]).output
        self.tensor[node.name] = pooled

    def is_flatten_reshape(self, args: tuple) -> bool:
        shape = args[1:] if len(args) > 2 else args[1] if len(args) == 2 else ()
        shape = list(shape) if isinstance(shape, (list, tuple)) else [shape]
        return len(shape) == 2 and shape[1] == -1 and isinstance(shape[0], fx.Node) and shape[0].name in self.size_nodes

    def is_flatten_method(self, method: str, args: tuple, kwargs: dict) -> bool:
        """x.flatten(1), or x.view/reshape(x.size(0), -1)."""
        if method == "flatten":
            return args[1:2] == (1,) or kwargs.get("start_dim") == 1
        return method in ("view", "reshape") and self.is_flatten_reshape(args)

    def call_function(self, node: fx.Node) -> None:
        fn, args, kwargs = node.target, node.args, node.kwargs
        if fn in _ADD_FUNCTIONS:
            self.add(node)
        elif fn in _RELU_FUNCTIONS:
            self.simple(node, "relu", self.unique(node.name))
        elif fn is F.relu6:
            self.simple(node, "clip", self.unique(node.name), {"min": 0.0, "max": 6.0})
        elif fn is F.hardtanh:
            lo, hi = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0), kwargs.get("max_val", 1.0)
            self.simple(node, "clip", self.unique(node.name), {"min": float(lo), "max": float(hi)})
        elif fn in _FLATTEN_FUNCTIONS:
            start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            if start != 1 or end != -1:
                self.unknown(node, f"flatten({start}, {end})")
            self.simple(node, "flatten", self.unique(node.name))
        elif fn is F.adaptive_avg_pool2d:
            if _pair(kwargs.get("output_size", args[1] if len(args) > 1 else None)) != [1, 1]:
                self.unknown(node, "adaptive_avg_pool2d to a size other than 1")
            self.simple(node, "global_avgpool", self.unique(node.name))
        elif fn is torch.mean:
            self.mean(node, args, dict(kwargs))
        elif fn is F.dropout:
            self.tensor[node.name] = self.arg(node, args[0])
        else:
            self.unknown(node, f"function {getattr(fn, '__name__', fn)}")

    def call_method(self, node: fx.Node) -> None:
        method, args, kwargs = node.target, node.args, dict(node.kwargs)
        if method == "size" and (args[1:] == (0,) or kwargs.get("dim") == 0):
            self.size_nodes.add(node.name)
        elif method in ("relu", "relu_"):
            self.simple(node, "relu", self.unique(node.name))
        elif method in ("add", "add_", "__add__") and len(args) == 2:
            self.add(node)
        elif self.is_flatten_method(method, args, kwargs):
            self.simple(node, "flatten", self.unique(node.name))
        elif method == "mean":
            self.mean(node, args, kwargs)
        else:
            self.unknown(node, f"method .{method}()")

    def run(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "placeholder":
                if self.tensor:
                    raise FatqError(f"cannot fold a model with more than one input (node {node.name!r}).")
                self.tensor[node.name] = INPUT_NAME
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op == "call_function":
                self.call_function(node)
            elif node.op == "call_method":
                self.call_method(node)
            elif node.op == "output":
                self.output_name = self.arg(node, node.args[0])
            else:
                self.unknown(node, f"{node.op} {node.target}")


def _finalize_params(nodes: list[DeployNode]) -> None:
    """Cast the float64 folding results to the float32 the engines use."""
    for node in nodes:
        for key in ("weight_scale", "bias"):
            if key in node.params:
                node.params[key] = node.params[key].astype(np.float32)
        if node.op in ("conv", "linear") and not node.attrs["quantized"]:
            node.params["weight"] = node.params["weight"].astype(np.float32)


def model_metadata(model: nn.Module) -> dict:
    """What a graph should say about the model it came from (arch, spec, classes)."""
    meta = {}
    for key in ("arch", "arch_options", "num_classes"):
        if hasattr(model, key):
            meta[key] = copy.deepcopy(getattr(model, key))
    if hasattr(model, "spec"):
        meta["spec"] = model.spec.to_dict()
    return meta


def fold(model: nn.Module, input_shape: list[int] | None = None, disabled_quantizers: str = "error") -> DeployGraph:
    """Fold ``model`` (its weights as they are now; BN uses running statistics) into a deploy graph.

    Args:
        model: a registry model (quantized or FP32) or any model built from the supported layers.
        input_shape: [C, H, W]; default the registry's input size of ``model.arch``.
        disabled_quantizers: "error" (an integer engine needs every range: calibrate first) or
            "skip" (treat them as identity, as the model does; for the float baseline).

    Returns:
        A "folded" :class:`DeployGraph` (``quantized`` when the model has quantized layers).

    Raises:
        FatqError: an op the folder does not know (named), a disabled activation quantizer,
            weight integers outside int8, NaN/Inf weights.
    """
    if input_shape is None:
        from fatq.models import model_info

        input_shape = list(model_info(model.arch).input_size)
    if disabled_quantizers not in ("error", "skip"):
        raise ValueError(f"disabled_quantizers must be 'error' or 'skip', got {disabled_quantizers!r}")
    folder = _Folder(model, disabled_quantizers)
    with torch.no_grad():
        folder.run(trace(model))
    _finalize_params(folder.nodes)
    quantized = any(n.op == "quantize" for n in folder.nodes)
    graph = DeployGraph(
        nodes=folder.nodes,
        input_name=INPUT_NAME,
        input_shape=list(input_shape),
        output_name=folder.output_name,
        dialect="folded",
        quantized=quantized,
        meta=model_metadata(model),
    )
    graph.validate()
    return graph


def dequantized(graph: DeployGraph) -> DeployGraph:
    """The float baseline of a quantized folded graph: no activation quantization, float weights.

    Weights become integers · scale (float32; BN stays folded); ``quantize`` nodes are removed
    (their readers read the quantizer's input). A float graph is returned unchanged.
    """
    if not graph.quantized:
        return graph
    alias: dict[str, str] = {}
    nodes = []
    for node in graph.nodes:
        inputs = [alias.get(t, t) for t in node.inputs]
        if node.op == "quantize":
            alias[node.output] = inputs[0]
            continue
        attrs, params = dict(node.attrs), dict(node.params)
        if node.op in ("conv", "linear") and attrs.get("quantized"):
            shape = (-1,) + (1,) * (params["weight"].ndim - 1)
            params = {
                "weight": params["weight"].astype(np.float32) * params["weight_scale"].reshape(shape),
                "bias": params["bias"],
            }
            attrs["quantized"] = False
            attrs["dequantized"] = True
        nodes.append(DeployNode(node.name, node.op, inputs, node.output, attrs, params))
    result = DeployGraph(
        nodes=nodes,
        input_name=graph.input_name,
        input_shape=list(graph.input_shape),
        output_name=alias.get(graph.output_name, graph.output_name),
        dialect="folded",
        quantized=False,
        meta={**graph.meta, "dequantized_from_quantized_model": True},
    )
    result.validate()
    return result
