"""The deploy graph: a trained model as plain data (integers, scales, biases, ops), and its file format.

A :class:`DeployGraph` is a list of :class:`DeployNode` s in topological order. Each node reads
named tensors and writes one; its ``attrs`` are JSON values and its ``params`` numpy arrays.
Two dialects share these classes:

*folded* (:func:`export.fold.fold`): the model's own semantics with BN folded away —
    ``quantize`` {bits, signed, scale, qmin, qmax}: y = clamp(round_half_even(x / scale), qmin, qmax) · scale;
    ``conv`` {stride, padding, dilation, groups} and ``linear``: params ``weight`` (int8 integers
    when ``quantized``, else float32), ``weight_scale`` float32 [C_out] (quantized only, > 0) and
    ``bias`` float32 [C_out]: y = conv(x, weight · weight_scale) + bias;
    ``relu``; ``clip`` {min, max}; ``add``; ``maxpool`` {kernel, stride, padding, dilation,
    ceil_mode}; ``global_avgpool`` ([N, C, H, W] -> [N, C, 1, 1]); ``flatten`` (from axis 1);
    ``subsample_pad`` {pad}: x[:, :, ::2, ::2] with ``pad`` zero channels on each side.

*integer* (:func:`export.lower.lower`): what an integer engine runs — conv/linear become ``qconv``
    / ``qlinear`` with int32 biases and an output quantization (see :mod:`export.lower`), and
    ``pad_channels`` {pad} appends ``pad`` zero channels (an image's 3 channels -> 4).

A tensor that holds integers·scale carries its quantization in the producing node's
``attrs["out_quant"]`` = {scale, qmin, qmax} (and ``expand`` in the integer dialect, see
:func:`tensor_quant`); :meth:`DeployGraph.quant_of` finds it.

File format (``.deploy.npz``, written atomically): ``graph.json`` (a uint8 array holding the
UTF-8 JSON of everything but the arrays) and one array per parameter, keyed ``"<node>/<param>"``;
it loads with ``numpy.load(path)`` without pickle.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fatq.errors import FatqError
from fatq.io import atomic_path

GRAPH_FORMAT = "fatq-deploy-graph"
GRAPH_FORMAT_VERSION = 1
FOLDED_OPS = frozenset(
    {"quantize", "conv", "linear", "relu", "clip", "add", "maxpool", "global_avgpool", "flatten", "subsample_pad"}
)
INTEGER_OPS = FOLDED_OPS | {"qconv", "qlinear", "pad_channels"}
# Ops that move or select integer values without arithmetic: a quantized input stays quantized.
INTEGER_PRESERVING_OPS = frozenset({"maxpool", "flatten", "subsample_pad", "pad_channels"})


BIAS_ARITHMETICS = ("int32", "float")


def bias_arithmetic(graph: DeployGraph) -> str:
    """How the engines a graph was exported for add conv biases (:mod:`export.reference`): its
    ``meta["bias_arithmetic"]``, else "int32" (a graph rebuilt from a checkpoint, or an older file)."""
    return graph.meta.get("bias_arithmetic", "int32")


def tensor_quant(out_quant: dict) -> dict:
    """How a quantized tensor is stored: {scale, qmin, qmax} of the integers it holds.

    ``out_quant`` gives the quantizer: values round to multiples of ``scale`` in [qmin, qmax].
    With ``expand`` = j (integer dialect, :mod:`export.lower`) the tensor holds those integers
    times j at scale scale / j (float32): the same real values on a finer integer grid.
    """
    expand = int(out_quant.get("expand", 1))
    if expand == 1:
        return {"scale": out_quant["scale"], "qmin": out_quant["qmin"], "qmax": out_quant["qmax"]}
    scale = float(np.float32(out_quant["scale"]) / np.float32(expand))
    return {"scale": scale, "qmin": expand * out_quant["qmin"], "qmax": expand * out_quant["qmax"]}


@dataclass
class DeployNode:
    """One operation.

    Attributes:
        name: unique node name, normally the module path it came from (e.g. "layer1.0.conv1").
        op: operation name (see the module docstring).
        inputs: names of the tensors it reads.
        output: name of the tensor it writes.
        attrs: JSON-serialisable attributes.
        params: numpy arrays (weights, scales, biases).
    """

    name: str
    op: str
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "inputs": list(self.inputs),
            "output": self.output,
            "attrs": self.attrs,
        }


@dataclass
class DeployGraph:
    """A folded or lowered network.

    Attributes:
        nodes: topologically ordered nodes.
        input_name: the graph input (a normalized image batch, float32 [N, C, H, W]).
        input_shape: [C, H, W] the model was built for.
        output_name: the logits tensor, float32 [N, num_classes].
        dialect: "folded" or "integer".
        quantized: whether the network has quantized layers (False for FP32 models and float graphs).
        meta: provenance and preprocessing (arch, spec, normalization, class names, calibration...).
    """

    nodes: list[DeployNode]
    input_name: str
    input_shape: list[int]
    output_name: str
    dialect: str = "folded"
    quantized: bool = True
    meta: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[DeployNode]:
        return iter(self.nodes)

    def producers(self) -> dict[str, DeployNode]:
        """{tensor name: node writing it}."""
        return {node.output: node for node in self.nodes}

    def consumers(self) -> dict[str, list[DeployNode]]:
        """{tensor name: nodes reading it} (the graph output has none)."""
        users: dict[str, list[DeployNode]] = {}
        for node in self.nodes:
            for name in node.inputs:
                users.setdefault(name, []).append(node)
        return users

    def node(self, name: str) -> DeployNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def quant_of(self, tensor: str) -> dict | None:
        """{scale, qmin, qmax} of a tensor holding integers · scale, else None (a float tensor)."""
        producer = self.producers().get(tensor)
        return None if producer is None else producer.attrs.get("out_quant")

    def ops(self) -> set[str]:
        return {node.op for node in self.nodes}

    def channels(self) -> dict[str, int]:
        """{tensor name: its channel count (dim 1)}: the input's ``input_shape[0]``, a conv's or linear's
        ``weight.shape[0]``, plus the zero channels of ``pad_channels`` / ``subsample_pad``; other ops keep
        their first input's."""
        counts = {self.input_name: int(self.input_shape[0])}
        for node in self.nodes:
            if "weight" in node.params:
                counts[node.output] = int(node.params["weight"].shape[0])
            else:
                added = {"pad_channels": 1, "subsample_pad": 2}.get(node.op, 0) * int(node.attrs.get("pad", 0))
                counts[node.output] = counts[node.inputs[0]] + added
        return counts

    def validate(self) -> None:
        """Check names are unique, every input is defined before use and ops belong to the dialect."""
        known = INTEGER_OPS if self.dialect == "integer" else FOLDED_OPS
        defined = {self.input_name}
        names = set()
        for node in self.nodes:
            if node.op not in known:
                raise FatqError(
                    f"deploy graph node {node.name!r} has op {node.op!r}, unknown to the {self.dialect} dialect."
                )
            if node.name in names:
                raise FatqError(f"deploy graph has two nodes named {node.name!r}.")
            names.add(node.name)
            missing = [t for t in node.inputs if t not in defined]
            if missing:
                raise FatqError(f"deploy graph node {node.name!r} reads {missing[0]!r} before it is written.")
            if node.output in defined:
                raise FatqError(f"deploy graph tensor {node.output!r} is written twice.")
            defined.add(node.output)
        if self.output_name not in defined:
            raise FatqError(f"deploy graph output {self.output_name!r} is never written.")

    # --- file format -------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "format": GRAPH_FORMAT,
            "format_version": GRAPH_FORMAT_VERSION,
            "dialect": self.dialect,
            "quantized": self.quantized,
            "input_name": self.input_name,
            "input_shape": list(self.input_shape),
            "output_name": self.output_name,
            "meta": self.meta,
            "nodes": [node.to_json() for node in self.nodes],
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """{"graph.json": UTF-8 JSON as uint8, "<node>/<param>": array} (the .npz entries)."""
        arrays = {"graph.json": np.frombuffer(json.dumps(self.to_json()).encode(), dtype=np.uint8)}
        for node in self.nodes:
            for key, value in node.params.items():
                arrays[f"{node.name}/{key}"] = np.ascontiguousarray(value)
        return arrays

    def save(self, path: str | Path) -> None:
        """Write ``path`` (.npz) atomically: JSON structure + one array per parameter."""
        path = Path(path)
        if not path.parent.is_dir():
            raise FatqError(f"directory {path.parent} does not exist (for {path.name}).")
        arrays = self.to_arrays()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez(path) would add .npz
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> DeployGraph:
        """Read a graph written by :meth:`save`."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise FatqError(f"{path} is not a readable deploy graph ({type(exc).__name__}).") from None
        return cls.from_arrays(arrays, source=str(path))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], source: str = "deploy graph") -> DeployGraph:
        if "graph.json" not in arrays:
            raise FatqError(f"{source} has no graph.json entry; it is not a fatq deploy graph.")
        spec = json.loads(arrays["graph.json"].tobytes().decode())
        if spec.get("format") != GRAPH_FORMAT or spec.get("format_version", 0) > GRAPH_FORMAT_VERSION:
            raise FatqError(f"{source} is not a deploy graph this fatq can read.")
        nodes = []
        for entry in spec["nodes"]:
            prefix = entry["name"] + "/"
            params = {key[len(prefix) :]: value for key, value in arrays.items() if key.startswith(prefix)}
            nodes.append(
                DeployNode(entry["name"], entry["op"], entry["inputs"], entry["output"], entry["attrs"], params)
            )
        graph = cls(
            nodes=nodes,
            input_name=spec["input_name"],
            input_shape=spec["input_shape"],
            output_name=spec["output_name"],
            dialect=spec["dialect"],
            quantized=spec["quantized"],
            meta=spec["meta"],
        )
        graph.validate()
        return graph
