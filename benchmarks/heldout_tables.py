"""The tables and plot of ``heldout.py``'s rows (issues 23, 40), and its acceptance checks.

    .venv/bin/python benchmarks/heldout_tables.py RESULTS.jsonl [--model smollm2-135m|gemma3-270m] [--plot FILE.png]

Prints markdown for the model's grid (``heldout.GRIDS``): our GPTQ against GPTQModel (and RTN) with the
geometric mean of the in-domain perplexity ratios at 4 and 3 bits, the worst ratio and the time ratios;
LQ-LoRA against the uniform GPTQ curve; L4Q against our GPTQ; AWQ's scaling before RTN and before GPTQ
against RTN and GPTQ at the same bits (issue 41); every row. Each quantized row also gets
its share of RTN's loss closed at the same bits and group: 1 - (ln ppl - ln ppl_fp32) / (ln ppl_RTN -
ln ppl_fp32), the excess next-token loss over the fp32 model relative to RTN's (the honest measure on a
base that is itself quantized). A point not run yet is shown as ``-``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from heldout import GRIDS, Point


def _by_name(rows: list[dict]) -> dict[str, dict]:
    return {row["name"]: row for row in rows}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def rtn_share(rows: dict[str, dict], row: dict | None, key: str = "ppl") -> float | None:
    """The share of RTN's excess loss over fp32 that ``row`` closes, RTN at the row's bits, group and sym."""
    fp32 = rows.get("fp32")
    rtn = rows.get(Point("rtn", row["bits"], row["group"], row["sym"]).name) if row and row.get("bits") else None
    if not (fp32 and rtn and row.get(key)) or rtn[key] <= fp32[key]:
        return None
    return 1 - math.log(row[key] / fp32[key]) / math.log(rtn[key] / fp32[key])


def gptq_table(rows: dict[str, dict], grid: list[tuple]) -> list[str]:
    lines = ["| bits | group | grid | RTN | ours | GPTQModel | ours / GPTQModel | stdlib: ours / GPTQModel | "
             "RTN's loss closed: ours / GPTQModel (stdlib) | ours s | GPTQModel s | time ratio | CPU-time ratio | "
             "bits/param |", "|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for bits, group, sym in grid:
        names = {m: Point(m, bits, group, sym).name for m in ("rtn", "gptq", "gptqmodel")}
        rtn, ours, peer = (rows.get(names[m], {}) for m in ("rtn", "gptq", "gptqmodel"))
        ratio = lambda key, a=ours, b=peer: a[key] / b[key] if a.get(key) and b.get(key) else None  # noqa: E731
        lines.append(f"| {bits} | {group} | {'sym' if sym else 'asym'} | {_fmt(rtn.get('ppl'))} | {_fmt(ours.get('ppl'))} | "
                     f"{_fmt(peer.get('ppl'))} | {_fmt(ratio('ppl'))} | {_fmt(ratio('ppl_stdlib'))} | "
                     f"{_share(rows, ours)} / {_share(rows, peer)} | {_fmt(ours.get('seconds'), 0)} | {_fmt(peer.get('seconds'), 0)} | {_fmt(ratio('seconds'), 2)} | "
                     f"{_fmt(ratio('cpu_seconds'), 2)} | {_fmt(ours.get('bits_per_param'))} |")
    return lines


def _share(rows: dict[str, dict], row: dict | None) -> str:
    """``in-domain (stdlib)`` shares of RTN's loss closed, in percent."""
    if not row:
        return "-"
    shares = [rtn_share(rows, row, key) for key in ("ppl", "ppl_stdlib")]
    if shares[0] is None:
        return "-"
    return " ".join(f"{'(' * i}{100 * v:.0f}%{')' * i}" if v is not None else "-" for i, v in enumerate(shares))


def gptq_verdict(rows: dict[str, dict], grid: list[tuple]) -> list[str]:
    """The acceptance's GPTQ numbers: over the pairs at 4 and 3 bits."""
    ratios, times = [], []
    expected = sum(bits != 2 for bits, _, _ in grid)
    for bits, group, sym in grid:
        ours, peer = (rows.get(Point(m, bits, group, sym).name) for m in ("gptq", "gptqmodel"))
        if bits != 2 and ours and peer:
            ratios.append(ours["ppl"] / peer["ppl"])
            times.append(ours["seconds"] / peer["seconds"])
    if not ratios:
        return ["No 4/3-bit pair has run yet."]
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return [f"- {len(ratios)} of {expected} pairs at 4/3 bits: geometric mean of ours / GPTQModel (in-domain perplexity) "
            f"**{geomean:.3f}** (goal <= 0.98), worst {max(ratios):.3f} (goal <= 1.02), time ratios "
            f"{min(times):.2f}-{max(times):.2f} (goal <= 1)."]


def _uniform_curve(rows: dict[str, dict]) -> list[dict]:
    """Our uniform GPTQ, asymmetric (LQ-LoRA's grid), every group measured (g64, g128, per-channel):
    (bits per parameter, perplexity) sorted."""
    curve = [r for r in rows.values() if r["method"] == "gptq" and not r["sym"]]
    return sorted(curve, key=lambda r: r["bits_per_param"])


def curve_at(curve: list[dict], bits: float, key: str = "ppl") -> float | None:
    """The curve's perplexity at ``bits``, linear in log perplexity between its two neighbours; None outside."""
    for low, high in zip(curve, curve[1:]):
        if low["bits_per_param"] <= bits <= high["bits_per_param"]:
            share = (bits - low["bits_per_param"]) / (high["bits_per_param"] - low["bits_per_param"])
            return math.exp((1 - share) * math.log(low[key]) + share * math.log(high[key]))
    return None


def curve_position(row: dict, curve: list[dict]) -> str:
    """Where a point lies against the uniform curve: below / above (interpolated), or dominates / dominated
    (a uniform point at no fewer bits is worse / at no more bits is better), else outside the curve."""
    at = curve_at(curve, row["bits_per_param"])
    if at is not None:
        return f"{'below' if row['ppl'] <= at else 'above'} ({row['ppl'] / at:.3f}x the curve's {at:.3f})"
    if any(u["bits_per_param"] >= row["bits_per_param"] and u["ppl"] >= row["ppl"] for u in curve):
        return "below (beats a uniform point with more bits)"
    if any(u["bits_per_param"] <= row["bits_per_param"] and u["ppl"] <= row["ppl"] for u in curve):
        return "above (a uniform point with fewer bits is better)"
    return "outside the measured curve"


def lqlora_table(rows: dict[str, dict]) -> list[str]:
    lines = ["| method | budget or bits | bits/param (files) | in-domain ppl | stdlib ppl | against uniform GPTQ asym |",
             "|---|---:|---:|---:|---:|---|"]
    curve = _uniform_curve(rows)
    for row in curve + sorted((r for r in rows.values() if r["method"].startswith("lqlora")),
                              key=lambda r: (r["method"], r["bits"])):
        uniform = row["method"] == "gptq"
        group = "per-channel" if row["group"] == -1 else f"g{row['group']}"
        label = f"uniform GPTQ {group} asym" if uniform else row["method"]
        where = "-" if uniform else curve_position(row, curve)
        lines.append(f"| {label} | {row['bits']:g} | {row['bits_per_param']:.3f} | {_fmt(row['ppl'])} | "
                     f"{_fmt(row['ppl_stdlib'])} | {where} |")
    return lines


def l4q_table(rows: dict[str, dict]) -> list[str]:
    """L4Q against the GPTQ it starts from (same bits, group and symmetry, read from the L4Q rows), in
    domain and out of domain (stdlib)."""
    lines = ["| point | distill | in-domain ppl | / GPTQ | stdlib ppl | / GPTQ | RTN's loss closed (stdlib) | "
             "bits/param | s (with its GPTQ) |", "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    shown = set()
    for row in sorted((r for r in rows.values() if r["method"] == "l4q"), key=lambda r: r["name"]):
        base = rows.get(Point("gptq", row["bits"], row["group"], row["sym"]).name)
        if base and base["name"] not in shown:  # the GPTQ it starts from, once, above its L4Q rows
            shown.add(base["name"])
            lines.append(_l4q_line(rows, base, base))
        lines.append(_l4q_line(rows, row, base))
    return lines


def _l4q_line(rows: dict[str, dict], row: dict, base: dict | None) -> str:
    ratio = lambda key: row[key] / base[key] if base else None  # noqa: E731
    return (f"| {row['name']} | {'yes' if row.get('distill') else 'no'} | {_fmt(row['ppl'])} | "
            f"{_fmt(ratio('ppl'))} | {_fmt(row['ppl_stdlib'])} | {_fmt(ratio('ppl_stdlib'))} | "
            f"{_share(rows, row)} | {row['bits_per_param']:.3f} | {_fmt(row.get('seconds'), 0)} |")


def all_rows(rows: list[dict]) -> list[str]:
    named = _by_name(rows)
    lines = ["| point | in-domain ppl | stdlib ppl | RTN's loss closed (stdlib) | bits/param | disk MiB | s | CPU s | "
             "load avg | peak RSS MiB | commit |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        share = _share(named, row) if row["method"] not in ("fp32", "rtn") and row.get("group") else "-"
        lines.append(f"| {row['name']} | {_fmt(row['ppl'])} | {_fmt(row['ppl_stdlib'])} | {share} | "
                     f"{row['bits_per_param']:.3f} | "
                     f"{row['disk_mib']:.1f} | {_fmt(row.get('seconds'), 0)} | {_fmt(row.get('cpu_seconds'), 0)} | "
                     f"{_fmt(row.get('load_avg'), 1)} | {_fmt(row.get('peak_rss_mib'), 0)} | {row.get('commit', '-')} |")
    return lines


LQLORA_LABELS = {"lqlora-r0": "LQ-LoRA rank 0", "lqlora-r0-outputs": "LQ-LoRA rank 0, output Fisher",
                 "lqlora-r0-measured": "LQ-LoRA rank 0, measured costs",
                 "lqlora-r0-measured-layer": "LQ-LoRA rank 0, measured costs by layer",
                 "lqlora-r0-measured-g128": "LQ-LoRA rank 0, measured costs, g128",
                 "lqlora-r16": "LQ-LoRA rank 16"}
"""The plot's LQ-LoRA series, one per method (``heldout.VARIANTS``); a method without rows draws nothing."""


def plot(rows: dict[str, dict], path: Path) -> None:
    """In-domain perplexity against bits per parameter: the uniform GPTQ curve and LQ-LoRA's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    series = {"uniform GPTQ asym (g64, g128, per-channel)": _uniform_curve(rows)}
    series |= {label: [r for r in rows.values() if r["method"] == method] for method, label in LQLORA_LABELS.items()}
    for label, points in series.items():
        points = sorted(points, key=lambda r: r["bits_per_param"])
        if points:
            axes.plot([r["bits_per_param"] for r in points], [r["ppl"] for r in points], marker="o", label=label)
    axes.set_yscale("log")
    axes.set_xlabel("bits per parameter (linear layers, from the files)")
    axes.set_ylabel("perplexity, python-doc eval (log)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


AWQ_CONFIGS = ((4, True), (4, False), (3, True), (3, False))  # at group 128 (issue 41)


def awq_table(rows: dict[str, dict]) -> list[str]:
    """AWQ's scaling before RTN and before GPTQ, beside RTN and GPTQ at the same bits, g128."""
    lines = ["| bits | grid | RTN | AWQ+RTN | AWQ+RTN / RTN (stdlib) | GPTQ | AWQ+GPTQ | AWQ+GPTQ / GPTQ (stdlib) | "
             "RTN's loss closed: AWQ+RTN / GPTQ / AWQ+GPTQ | AWQ+RTN s | GPTQ s | AWQ+GPTQ s |",
             "|---:|---|---:|---:|---|---:|---:|---|---|---:|---:|---:|"]
    for bits, sym in AWQ_CONFIGS:
        rtn, awq_rtn, gptq, awq_gptq = (rows.get(Point(m, bits, 128, sym).name, {})
                                        for m in ("rtn", "awq-rtn", "gptq", "awq-gptq"))
        lines.append(f"| {bits} | {'sym' if sym else 'asym'} | {_fmt(rtn.get('ppl'))} | {_fmt(awq_rtn.get('ppl'))} | "
                     f"{_ratios(awq_rtn, rtn)} | {_fmt(gptq.get('ppl'))} | {_fmt(awq_gptq.get('ppl'))} | "
                     f"{_ratios(awq_gptq, gptq)} | {_share(rows, awq_rtn)} / {_share(rows, gptq)} / "
                     f"{_share(rows, awq_gptq)} | {_fmt(awq_rtn.get('seconds'), 0)} | {_fmt(gptq.get('seconds'), 0)} | "
                     f"{_fmt(awq_gptq.get('seconds'), 0)} |")
    return lines


def _ratios(row: dict, base: dict) -> str:
    """``in-domain (stdlib)`` perplexity ratios of ``row`` to ``base``."""
    if not (row.get("ppl") and base.get("ppl")):
        return "-"
    return f"{row['ppl'] / base['ppl']:.3f} ({row['ppl_stdlib'] / base['ppl_stdlib']:.3f})"


def awq_verdict(rows: dict[str, dict]) -> list[str]:
    """Does AWQ's scaling help? Over the pairs that ran: how many it improves on both texts, and the
    geometric means of the perplexity ratios (below 1: AWQ helps)."""
    lines = []
    for then in ("rtn", "gptq"):
        pairs = [(rows.get(Point(f"awq-{then}", b, 128, s).name), rows.get(Point(then, b, 128, s).name))
                 for b, s in AWQ_CONFIGS]
        pairs = [(a, b) for a, b in pairs if a and b]
        if not pairs:
            lines.append(f"- AWQ+{then.upper()}: no pair has run yet.")
            continue
        means = [math.exp(sum(math.log(a[k] / b[k]) for a, b in pairs) / len(pairs)) for k in ("ppl", "ppl_stdlib")]
        better = sum(a["ppl"] < b["ppl"] and a["ppl_stdlib"] < b["ppl_stdlib"] for a, b in pairs)
        lines.append(f"- AWQ+{then.upper()} against {then.upper()}, {len(pairs)} of {len(AWQ_CONFIGS)} configs: better on "
                     f"both texts in {better}; geometric mean of the ratios {means[0]:.3f} in domain, {means[1]:.3f} "
                     "on stdlib (below 1: AWQ helps).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--model", choices=sorted(GRIDS), default="smollm2-135m")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines()]
    named = _by_name(rows)
    grid, _ = GRIDS[args.model]
    sections = [gptq_table(named, grid), gptq_verdict(named, grid), lqlora_table(named), l4q_table(named),
                awq_table(named), awq_verdict(named), all_rows(rows)]
    print("\n\n".join("\n".join(section) for section in sections))
    if args.plot:
        plot(named, args.plot)


if __name__ == "__main__":
    main()
