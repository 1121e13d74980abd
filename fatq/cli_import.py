"""``fatq-import``: a checkpoint of the FAT reference code -> an ordinary fatq checkpoint.

    fatq-import REF.pth.tar --arch resnet20 --bits 4 [--shortcut B] -o model.pt

The written model's eval forward is the reference forward (fatq/reference_import.py); export it
with ``fatq-export model.pt --calib-data DIR`` (its stem/classifier inputs and residual Adds are
float, as in the reference, and are calibrated to 8 bits there).
"""

from __future__ import annotations

import sys
from pathlib import Path

from fatq.cli_common import SentenceParser, run_cli
from fatq.errors import FatqError
from fatq.models import list_models
from fatq.output_check import check_output_file


def build_parser() -> SentenceParser:
    p = SentenceParser(prog="fatq-import", description="Import a FAT reference-code checkpoint into fatq.")
    p.add_argument("checkpoint", help="reference checkpoint (.pth.tar: epoch, state_dict, best_top1_acc)")
    p.add_argument("--arch", required=True, choices=list_models(), metavar="ARCH", help="fatq architecture name")
    p.add_argument("--bits", required=True, type=int, help="bits it was trained at (weights = activations), 32: FP32")
    p.add_argument("--shortcut", choices=("A", "B"), default="B", help="CIFAR ResNet shortcut (reference: B)")
    p.add_argument("-o", "--output", required=True, help="fatq checkpoint to write (.pt)")
    return p


def _main(argv: list[str] | None) -> int:
    from fatq.reference_import import import_reference, save_imported

    args = build_parser().parse_args(argv)
    output = Path(args.output)
    if output.resolve() == Path(args.checkpoint).resolve():
        raise FatqError("--output must differ from the input checkpoint.")
    check_output_file(output, "output checkpoint (-o)")
    model, report = import_reference(args.checkpoint, args.arch, args.bits, args.shortcut)
    save_imported(model, report, output)
    bits = f"w{args.bits}a{args.bits}"
    print(f"imported {report.source} (sha256 {report.sha256[:12]}…, epoch {report.epoch}) as {args.arch} {bits}")
    if report.dropped_keys:
        dropped = ", ".join(report.dropped_keys)
        print(f"  dropped {len(report.dropped_keys)} unused key(s) (stem/classifier transforms): {dropped}")
    for name, (lo, hi) in report.edge_integer_ranges.items():
        note = "  (below -127: export re-quantizes it, see docs/import.md)" if name in report.beyond_int8 else ""
        print(f"  {name}: signed-max 8-bit weight integers [{lo}, {hi}]{note}")
    print(f"wrote {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 on success, 2 on bad input (one sentence, nothing written)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
