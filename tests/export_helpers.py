"""Models with trained-like statistics for the export tests (random weights, realistic ranges)."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from fatq.models import create_model, model_info
from fatq.quantizers import ActivationQuantizer

IMAGENET_TEST_SIZE = 64  # ImageNet models run at 64x64 in tests (global pooling makes any size work)


def quantizer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[ActivationQuantizer, torch.Tensor]]:
    """{name: (activation quantizer, what it read)} for one eval forward of ``model`` on ``x``."""
    seen: dict[str, tuple[ActivationQuantizer, torch.Tensor]] = {}
    hooks = [
        q.register_forward_hook(lambda m, args, _, n=n: seen.update({n: (m, args[0])}))
        for n, q in model.named_modules()
        if isinstance(q, ActivationQuantizer)
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def input_shape_for(name: str) -> list[int]:
    """[C, H, W] a test feeds ``name``: its registry size, ImageNet models at 64x64."""
    c, h, w = model_info(name).input_size
    return [c, IMAGENET_TEST_SIZE, IMAGENET_TEST_SIZE] if model_info(name).family == "imagenet" else [c, h, w]


def trained_like(name: str, bits: int | tuple[int, int], seed: int = 0, batch: int = 4, **options) -> nn.Module:
    """A registry model in eval mode whose statistics look trained.

    In a training-mode pass over a random batch every activation quantizer's α is set, in forward
    order, to 0.5–1x the largest |input| it sees (ranges fit the data, some values clip) and
    BatchNorm keeps that batch's statistics; then γ is made random with every 5th channel
    negative, β random, and the ranges are fitted again in eval mode.
    """
    torch.manual_seed(seed)
    model = create_model(name, bits=bits, **options)
    shape = input_shape_for(name)

    def fit_range(quantizer, args):
        peak = float(args[0].abs().max())
        quantizer.set_range(peak * (0.5 + 0.5 * torch.rand(()).item()) if peak > 0 else 1.0)

    def forward_fitting_ranges():
        hooks = [m.register_forward_pre_hook(fit_range) for m in model.modules() if isinstance(m, ActivationQuantizer)]
        with torch.no_grad():
            model(torch.randn(batch, *shape))
        for hook in hooks:
            hook.remove()

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0  # running statistics := those of the batch below
    model.train()
    forward_fitting_ranges()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            channels = module.num_features
            gamma = torch.rand(channels) * 0.8 + 0.6
            gamma[::5] *= -1
            module.weight.data = gamma
            module.bias.data = torch.randn(channels) * 0.3
    model.eval()
    forward_fitting_ranges()
    return model


# Registry models the ONNX writers are tested on: (name, bits, create_model options)
WRITER_CASES = [
    ("resnet20", 4, {}),
    ("resnet20", 2, {"shortcut": "B"}),
    ("vgg_small", 3, {}),
    ("mobilenetv2", 4, {}),
    ("resnet18", 8, {}),
]


@functools.cache
def lowered_case(name: str, bits: int, options: str):
    """(trained-like model, its lowered deploy graph); ``options`` is JSON so the result can be cached."""
    from export.pipeline import deploy_graph

    model = trained_like(name, bits, **json.loads(options))
    return model, deploy_graph(model, input_shape_for(name))


def compare_written(
    onnx_model, name: str, model: nn.Module, graph, path, unobserved: frozenset = frozenset(), spread: float = 1.0
) -> dict:
    """Save a written model to ``path`` and run ``fatq-export --check``'s comparison on 6 random inputs
    (normal, times ``spread``: 3 saturates the image quantizer on ~10 % of the values).

    Also asserts what holds for every writer: each quantized tensor but ``unobserved`` is observed,
    and exposing the intermediate tensors left the logits unchanged.
    """
    import onnx

    from engines.deploy_check import compare
    from export.reference import DeployReference

    onnx.checker.check_model(onnx_model, full_check=True)
    onnx.save(onnx_model, str(path))
    inputs = torch.randn(6, *input_shape_for(name), generator=torch.Generator().manual_seed(0)) * spread
    report = compare(path, graph, model, inputs, batch_size=3, quiet=True)
    assert report["int8_tensors"] == len(DeployReference(graph).quant) - len(unobserved)
    assert set(report["unobserved_int8_tensors"]) == set(unobserved)
    assert report["debug_copy_logits_identical"]
    return report


def benchmark_script(name: str):
    """The module ``benchmarks/<name>.py``, loaded from its file (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
