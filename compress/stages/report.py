"""Stage reports, the run summary table, and ``report.json`` / ``report.md``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table

from ..checkpoint.atomic import atomic_write_text

SUMMARY_COLUMNS = ("#", "stage", "device", "seconds", "peak RSS MiB", "peak CUDA MiB", "bits/param", "size on disk",
                   "perplexity")


@dataclass
class StageReport:
    """What one stage did: where it computed, timings, peak memory (host RSS; the CUDA allocator's
    peak when it computed on a GPU), headline metrics, per-module rows, skips."""

    name: str
    index: int
    device: str = "cpu"
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    peak_cuda_mib: float | None = None
    metrics: dict = field(default_factory=dict)
    modules: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def skip(self, module: str, reason: str) -> None:
        self.skipped.append({"module": module, "reason": reason})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StageReport":
        return cls(**data)


def human_bytes(size: float | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def summary_rows(reports: list[StageReport]) -> list[tuple[str, ...]]:
    rows = []
    for report in reports:
        m = report.metrics
        bits = m.get("bits_per_param")
        ppl = m.get("perplexity")
        rows.append((
            "-" if report.index < 0 else str(report.index),
            report.name + (f" ({m['label']})" if m.get("label") else ""),
            report.device,
            f"{report.seconds:.1f}",
            f"{report.peak_rss_mib:.0f}",
            "-" if report.peak_cuda_mib is None else f"{report.peak_cuda_mib:.0f}",
            f"{bits:.3f}" if bits is not None else "-",
            human_bytes(m.get("size_bytes")),
            f"{ppl:.3f}" if ppl is not None else "-",
        ))
    return rows


def summary_table(reports: list[StageReport], title: str = "compress run") -> Table:
    table = Table(title=title)
    for column in SUMMARY_COLUMNS:
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in summary_rows(reports):
        table.add_row(*row)
    return table


def markdown_report(reports: list[StageReport], header: dict) -> str:
    lines = [f"# compress report: {header.get('output', '')}", ""]
    for key, value in header.items():
        lines.append(f"- **{key}**: {value}")
    lines += ["", "| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(reports)]
    for report in reports:
        if not (report.notes or report.skipped):
            continue
        lines += ["", f"## {report.name}" + (f" (stage {report.index})" if report.index >= 0 else "")]
        lines += [f"- {note}" for note in report.notes]
        lines += [f"- skipped `{s['module']}`: {s['reason']}" for s in report.skipped]
    return "\n".join(lines) + "\n"


def write_reports(out_dir: Path, reports: list[StageReport], header: dict) -> tuple[Path, Path]:
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    payload = {"header": header, "stages": [r.to_dict() for r in reports]}
    atomic_write_text(json_path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    atomic_write_text(md_path, markdown_report(reports, header))
    return json_path, md_path
