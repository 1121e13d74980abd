"""The legacy TensorRT entropy calibrator: runs only with tensorrt 10.x, pycuda and a CUDA GPU."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from calibration.trt_cache import parse_cache, read_cache, trt_version_code
from fatq.errors import MissingExtraError

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_PYCUDA = importlib.util.find_spec("pycuda") is not None
needs_trt = pytest.mark.skipif(
    not (HAVE_TRT and HAVE_PYCUDA and torch.cuda.is_available()),
    reason="needs tensorrt 10.x, pycuda and a CUDA GPU (none of which this machine has)",
)


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_missing_tensorrt_names_the_extra():
    from calibration.trt_calibrator import make_entropy_calibrator

    with pytest.raises(MissingExtraError, match=r"fatq\[trt\]"):
        make_entropy_calibrator([], batch_size=1)


def _tiny_onnx(path, batch):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    torch.onnx.export(
        model, torch.zeros(batch, 3, 16, 16), str(path), input_names=["input"], output_names=["out"], dynamo=False
    )


def _build(onnx_path, calibrator):
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # weakly typed: implicit INT8 needs it (TensorRT 10.x)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)
    config.int8_calibrator = calibrator
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    return plan


@pytest.mark.gpu
@pytest.mark.trt
@needs_trt
def test_entropy_calibrator_writes_a_cache_we_can_read(tmp_path):
    import tensorrt as trt

    from calibration.trt_calibrator import make_entropy_calibrator

    batch = 4
    onnx_path, cache_path = tmp_path / "tiny.onnx", tmp_path / "calib.cache"
    _tiny_onnx(onnx_path, batch)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, 3, 16, 16, generator=g) * 2 for _ in range(5)]
    calibrator = make_entropy_calibrator(batches, batch, cache_path)
    _build(onnx_path, calibrator)
    assert calibrator.batches_served == 5
    cache = read_cache(cache_path)
    assert cache.version == trt_version_code(trt.__version__)  # checks fatq's version-code rule too
    assert cache.algorithm == "EntropyCalibration2"
    peak = float(torch.cat(batches).abs().max())
    assert 0 < cache.scales["input"] <= peak / 127 * 1.01
    assert all(np.isfinite(s) and s > 0 for s in cache.scales.values())

    again = make_entropy_calibrator(batches, batch, cache_path, use_cache=True)
    _build(onnx_path, again)
    assert again.batches_served == 0  # TensorRT took the cache instead of calibrating
    assert parse_cache(cache_path.read_bytes()) == cache
