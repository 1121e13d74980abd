"""Float ONNX of a folded float deploy graph (an FP32 model, or :func:`export.fold.dequantized`)."""

from __future__ import annotations

import numpy as np
import onnx

from export.deploy_graph import DeployGraph, DeployNode
from export.onnx_builder import (
    DEFAULT_OPSET,
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxBuilder,
    conv_attrs,
    emit_float_op,
    make_model,
    output_classes,
)
from fatq.errors import FatqError


def float_layer(b: OnnxBuilder, node: DeployNode, inputs: list[str], output: str | None) -> str:
    weight = b.initializer(f"{node.name}.weight", node.params["weight"].astype(np.float32))
    bias = b.initializer(f"{node.name}.bias", node.params["bias"].astype(np.float32))
    if node.op == "conv":
        return b.node("Conv", [inputs[0], weight, bias], output, node.name, **conv_attrs(node.attrs))
    return b.node("Gemm", [inputs[0], weight, bias], output, node.name, transB=1)


def write_float(graph: DeployGraph, opset: int = DEFAULT_OPSET, metadata: dict | None = None) -> onnx.ModelProto:
    """Float ONNX of a folded float graph (an FP32 model, or :func:`export.fold.dequantized`)."""
    if graph.dialect != "folded" or graph.quantized:
        raise FatqError("write_float needs a folded float graph (use export.fold.dequantized for a quantized model).")
    b = OnnxBuilder(opset)
    names = {graph.input_name: INPUT_NAME}
    for node in graph.nodes:
        inputs = [names[t] for t in node.inputs]
        output = OUTPUT_NAME if node.output == graph.output_name else None
        if node.op in ("conv", "linear"):
            names[node.output] = float_layer(b, node, inputs, output)
        else:
            names[node.output] = emit_float_op(b, node, inputs, output)
    return make_model(graph, b, metadata, output_classes(graph))
