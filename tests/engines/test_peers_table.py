"""benchmarks/peers.py's table: each fatq row against its engine's own PTQ graph, from medians and fastest calls."""

from __future__ import annotations

import pytest
from export_helpers import benchmark_script


@pytest.fixture(scope="module")
def peers():
    return benchmark_script("peers")


def _report(latencies: dict[tuple[str, str], tuple[float, float]]) -> tuple[dict, dict]:
    """A fatq-bench report of batch-64 runs: (engine, file) -> (fastest ms, median ms); and the files' roles."""
    configs, runs = [], []
    for (engine, name), (fastest, median) in latencies.items():
        label = f"{engine}:{name}"
        configs.append({"label": label, "engine": engine, "model": f"work/{name}"})
        runs.append(
            {"label": label, "batch_size": 64, "throughput_ips": 64_000 / median,
             "latency_ms": {"min": fastest, "median": median}}
        )  # fmt: skip
    roles = {
        "nncf.xml": "peer: NNCF 8-bit (IR)",
        "qdq.onnx": "peer: ORT quantize_static U8S8 QDQ",
        "qop.onnx": "peer: ORT quantize_static U8S8 QOperator",
        "w4-ov.onnx": "fatq W4A4 onnx-openvino, --target cpu",
        "w4-ort.onnx": "fatq W4A4 onnx-ort, --target cpu",
    }
    return {"configs": configs, "runs": runs, "accuracy": {}}, roles


def test_each_engine_compares_with_its_own_ptq_graph_not_the_fastest_peer(peers):
    # ORT's QDQ file is the fastest graph in OpenVINO, but OpenVINO's own tool is NNCF
    report, roles = _report(
        {
            ("openvino", "nncf.xml"): (8.0, 10.0),
            ("openvino", "qdq.onnx"): (7.5, 8.0),
            ("openvino", "w4-ov.onnx"): (8.4, 9.0),
            ("ort", "qdq.onnx"): (10.0, 12.0),
            ("ort", "qop.onnx"): (9.9, 12.5),
            ("ort", "w4-ort.onnx"): (10.0, 11.0),
        }
    )
    rows = peers.rows_of(report, roles, {name: 1024 for name in roles}, {})
    peers.add_ratios(rows)
    fatq = {r["file"]: r for r in rows if r["graph"].startswith("fatq")}
    assert fatq["w4-ov.onnx"]["vs_peer"] == pytest.approx(10.0 / 9.0)  # medians: fatq ahead under load
    assert fatq["w4-ov.onnx"]["vs_peer_fastest"] == pytest.approx(8.0 / 8.4)  # fastest calls: behind
    assert fatq["w4-ort.onnx"]["vs_peer"] == pytest.approx(12.0 / 11.0)  # the faster U8S8 median
    assert fatq["w4-ort.onnx"]["vs_peer_fastest"] == pytest.approx(9.9 / 10.0)  # the faster U8S8 fastest call
    assert all("vs_peer" not in r for r in rows if r["graph"].startswith("peer"))

    table = peers.markdown("resnet20", rows)
    assert "| 1.11× | 0.95× |" in table
    # medians 1.0667x (ORT's QDQ in OpenVINO) to 1.2626x (QOperator in ONNX Runtime) their fastest calls
    assert "Batch-64 medians 7–26 % above the fastest calls" in table
