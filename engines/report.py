"""Human-readable views of a bench report: terminal tables, markdown, and a PNG plot.

All functions take the report dict of :func:`engines.bench.run_benchmark` (schema in
``docs/bench_schema.md``); the JSON file is that dict as is.
"""

from __future__ import annotations

from pathlib import Path

from fatq.errors import FatqError
from fatq.extras import import_extra
from fatq.io import atomic_path


def format_table(headers: list[str], rows: list[list], markdown: bool = False) -> str:
    """Align ``rows`` under ``headers``; numbers right-aligned. Markdown pipes when ``markdown``."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |" if markdown else "  ".join(parts).rstrip()

    out = [line(cells[0])]
    if markdown:
        rules = [("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)]
        out.append("|" + "|".join(rules) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def _sections(report: dict, markdown: bool) -> list[str]:
    title = (lambda text: f"### {text}") if markdown else (lambda text: f"{text}:")
    sections = []
    configs = [
        [
            c["label"],
            c["engine"],
            c["engine_version"].split("-")[0],  # OpenVINO appends a long build tag
            c["precision"],
            c["device"],
            c["threads"],
            c["memory_bytes"],
            config_notes(c),
        ]
        for c in report["configs"]
    ]
    headers = ["run", "engine", "version", "precision", "device", "threads", "memory B", "notes"]
    sections.append(title("Engines") + "\n" + format_table(headers, configs, markdown))
    latency = [
        [
            r["label"],
            r["batch_size"],
            r["latency_ms"]["min"],
            r["latency_ms"]["median"],
            r["latency_ms"]["p90"],
            r["latency_ms"]["p99"],
            r["latency_ms"]["max"],
            r["throughput_ips"],
        ]
        for r in report["runs"]
    ]
    sections.append(
        title("Latency (ms) and throughput")
        + "\n"
        + format_table(["run", "batch", "min", "median", "p90", "p99", "max", "images/s"], latency, markdown)
    )
    transfers = [
        [r["label"], r["batch_size"], r["transfer_ms"]["h2d"]["median"], r["transfer_ms"]["d2h"]["median"]]
        for r in report["runs"]
        if r.get("transfer_ms")
    ]
    if transfers:
        sections.append(
            title("Host<->device copies (median ms, not in the latency above)")
            + "\n"
            + format_table(["run", "batch", "host->device", "device->host"], transfers, markdown)
        )
    if report["ratios"]:
        ratios = [
            [r["engine"], r["kind"], r["batch_size"], r["numerator"], r["denominator"], r["throughput_ratio"]]
            for r in report["ratios"]
        ]
        sections.append(
            title("Throughput ratios")
            + "\n"
            + format_table(["engine", "ratio", "batch", "numerator", "denominator", "x"], ratios, markdown)
        )
    labels = [c["label"] for c in report["configs"]]
    accuracy, agreement = report["accuracy"], report["agreement"]
    if accuracy or agreement:
        rows = []
        for label in labels:
            acc, agr = accuracy.get(label, {}), agreement.get(label, {})
            rows.append(
                [
                    label,
                    acc.get("top1"),
                    acc.get("top5"),
                    agr.get("top1_agreement_pct"),
                    agr.get("max_abs_logit_diff"),
                    agr.get("mean_abs_logit_diff"),
                    agr.get("cosine"),
                ]
            )
        reference = report.get("reference")
        if reference and "top1" in reference:
            rows.append(["reference (torch eval)", reference["top1"], reference["top5"], None, None, None, None])
        sections.append(
            title(f"Accuracy (%) and agreement with the reference, on {report['settings']['eval_inputs']}")
            + "\n"
            + format_table(
                ["run", "top-1", "top-5", "agreement", "max |dlogit|", "mean |dlogit|", "cosine"], rows, markdown
            )
        )
    gate = report["gate"]
    if gate["min_agreement_pct"] is not None or gate["max_accuracy_drop_pts"] is not None:
        verdict = "passed" if gate["passed"] else "FAILED: " + "; ".join(gate["reasons"])
        sections.append(f"{title('Parity gate')} {verdict}")
    if report["skipped"]:
        skipped = [[Path(s["model"]).name, s["engine"], s["precision"], s["reason"]] for s in report["skipped"]]
        sections.append(
            title("Skipped (requested, does not apply)")
            + "\n"
            + format_table(["model", "engine", "precision", "reason"], skipped, markdown)
        )
    return sections


def config_notes(config: dict) -> str:
    """A short note on the engine settings that explain a run's numbers (and a fixed batch)."""
    note = _engine_note(config)
    if config.get("fixed_batch"):
        note = f"{note}; " if note else ""
        note += f"fixed batch {config['fixed_batch']} (runs at that batch only)"
    return note


def _engine_note(config: dict) -> str:
    options, engine = config["options"], config["engine"]
    if engine == "openvino":
        note = f"precision hint {options['inference_precision_hint']}"
        if options.get("compiled_inference_precision"):
            note += f" (compiled: {options['compiled_inference_precision']})"
        if options["inference_precision_hint"] == "bf16" and not options.get("cpu_native_bf16"):
            note += ", no native BF16 on this CPU"
        return note
    if engine.startswith("ort"):
        return "providers " + "+".join(p if isinstance(p, str) else p[0] for p in options.get("providers", []))
    if engine == "trt":
        flags = ",".join(options.get("builder_flags") or []) or "none"
        return f"{options.get('typing')} typing, builder flags {flags}, engine-only time"
    if engine.startswith("torch"):
        return f"{options.get('mode')} mode" + (", fake-quant" if options.get("fake_quant") else "")
    return ""


def terminal_report(report: dict) -> str:
    """Plain-text tables for the terminal."""
    return "\n\n".join(_sections(report, markdown=False)) + "\n"


def markdown_report(report: dict) -> str:
    """Markdown tables with the command and provenance, for READMEs and CI summaries."""
    header = [
        "## fatq-bench",
        "",
        f"`{report['command']}`",
        "",
        f"fatq {report['fatq_version']} ({report['git_commit']}), {report['created_utc']}, "
        f"{report['host']['cpu']}, Python {report['host']['python']}.",
        "",
    ]
    return "\n".join(header) + "\n\n".join(_sections(report, markdown=True)) + "\n"


def write_plot(report: dict, path: str | Path) -> None:
    """PNG: median latency and throughput per batch size per run, and top-1 (or agreement) per run."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FatqError(f"directory {path.parent} does not exist (for {path.name}).")
    import_extra("matplotlib").use("Agg")
    import matplotlib.pyplot as plt

    labels = [c["label"] for c in report["configs"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for label in labels:
        runs = sorted((r for r in report["runs"] if r["label"] == label), key=lambda r: r["batch_size"])
        batches = [r["batch_size"] for r in runs]
        axes[0].plot(batches, [r["latency_ms"]["median"] for r in runs], marker="o", label=label)
        axes[1].plot(batches, [r["throughput_ips"] for r in runs], marker="o", label=label)
    for ax, ylabel in ((axes[0], "median latency (ms)"), (axes[1], "throughput (images/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize="small")
    if report["accuracy"]:
        values, ylabel = [report["accuracy"].get(label, {}).get("top1", 0.0) for label in labels], "top-1 (%)"
    elif report["agreement"]:
        values = [report["agreement"].get(label, {}).get("top1_agreement_pct", 0.0) for label in labels]
        ylabel = "top-1 agreement with reference (%)"
    else:
        values, ylabel = [], "no accuracy measured (pass --data-dir or --reference)"
    if values:
        axes[2].bar(range(len(labels)), values)
        axes[2].set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
        low = min(values)
        axes[2].set_ylim(max(0.0, low - 5.0), 100.0)
        reference = report.get("reference") or {}
        if report["accuracy"] and "top1" in reference:
            axes[2].axhline(reference["top1"], color="black", linestyle="--", label="reference")
            axes[2].legend(fontsize="small")
    axes[2].set_ylabel(ylabel)
    fig.suptitle(f"fatq-bench: {report['settings']['eval_inputs']}", fontsize="medium")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
