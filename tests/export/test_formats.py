"""The format table: every format's writer output is recognised by its recorded tag, and the
engine-specific ones also without it (by their custom op domain)."""

from __future__ import annotations

import pytest
from export_helpers import lowered_case

from export.fold import dequantized, fold
from export.formats import DEPLOY_GRAPH, FORMATS, PORTABLE_ENGINES, REFERENCE, companion_path, format_of
from export.onnx_builder import DEFAULT_OPSET


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_of_reads_the_recorded_tag(name):
    fmt = FORMATS[name]
    model, graph = lowered_case("resnet20", 4, "{}")
    graph = graph if fmt.int8 else dequantized(fold(model, [3, 32, 32], disabled_quantizers="skip"))
    written = fmt.write(graph, DEFAULT_OPSET, {"format": fmt.metadata_tag})
    assert format_of(written) is fmt
    untagged = fmt.write(graph, DEFAULT_OPSET, {})
    # without a tag only a custom op domain tells: the portable formats are plain ONNX
    assert format_of(untagged) is (fmt if fmt.domain else None)
    assert (fmt.only_engine is None) == (fmt.purpose is None) == (fmt.domain is None)
    assert fmt.check_engine in fmt.engines


def test_an_imported_domain_no_node_uses_does_not_make_a_file_engine_specific():
    """ONNX Runtime's quant_pre_process imports com.microsoft into every file it writes."""
    import onnx

    model, graph = lowered_case("resnet20", 4, "{}")
    written = FORMATS["onnx"].write(graph, DEFAULT_OPSET, {})
    ort_domain = next(f.domain for f in FORMATS.values() if f.name == "onnx-ort")
    written.opset_import.append(onnx.helper.make_opsetid(ort_domain, 1))
    assert format_of(written) is None


def test_companion_paths_and_tags_are_distinct():
    assert companion_path("runs/m.ort.onnx", DEPLOY_GRAPH).as_posix() == "runs/m.ort.deploy.npz"
    assert companion_path("m.onnx", REFERENCE).name == "m.reference.pt"
    assert len({f.suffix for f in FORMATS.values()}) == len({f.metadata_tag for f in FORMATS.values()}) == len(FORMATS)


def test_engine_names_match_the_engine_table():
    """export/ cannot import engines/: the names its table uses are checked against engines.registry here."""
    from engines.model_files import ONNX
    from engines.registry import ENGINES

    assert set(PORTABLE_ENGINES) == {e.name for e in ENGINES.values() if ONNX in e.kinds}
    for fmt in FORMATS.values():
        assert set(fmt.engines) <= set(ENGINES) and fmt.check_engine in ENGINES
        if fmt.only_engine:
            assert ENGINES[fmt.only_engine].custom_ops, fmt.name  # the skip reason other engines give
