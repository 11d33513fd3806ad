"""GPTQ of SmolLM2-135M on 128 x 512 calibration windows: ours with the packed calibration forward
(before issue 21), ours with the dense-twin fast path (after), and GPTQModel 7.6.0, in one run.

    .venv/bin/python benchmarks/gptq_calibration_speed.py [--out out/bench/gptq_calibration] [--bits 4]

Every point is its own process, one after another (their wall times do not overlap), on the same
calibration windows (stdlib train text, 128 x 512 tokens, written once) and the same fp32 model;
GPTQ int4 g64 asymmetric, damp 0.01, no act order on both sides (what the comparison fixes; GPTQModel
otherwise at its defaults). Seconds are the quantization alone: our quantize stage, GPTQModel's ``quantize()`` call (loading,
export and evaluation excluded on both sides). ``COMPRESS_GPTQ_CALIBRATION=packed`` runs the already-quantized linears of
the layer being calibrated through the packed kernels, as before the fast path. Perplexity on 32
held-out windows (stdlib eval, 512 tokens) scores each checkpoint with the same loader. Needs
``make interop-venv`` (or ``COMPRESS_INTEROP_PYTHON``). Resumable: a finished point keeps its
``points/NAME/row.json``. Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from child import bench_args, child_result, run_child  # noqa: E402
from peers import GROUP, dense_model_dir, gptqmodel_quantize  # noqa: E402

DATA = {"calibration": {"source": "stdlib", "split": "train", "samples": 128, "seq_len": 512},
        "eval": {"source": "stdlib", "split": "eval", "samples": 32, "seq_len": 512}}
POINTS = ("ours-packed", "ours-dense", "gptqmodel")


def windows_file(out: Path) -> Path:
    """The 128 calibration and 32 eval windows every point sees, as token ids (written once)."""
    path = out / "windows-128.safetensors"
    if not path.is_file():
        from safetensors.torch import save_file

        from compress.models.data import token_windows
        from compress.models.sources import load_tokenizer, resolve_model
        from compress.run.recipe import parse_recipe

        tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
        spec = parse_recipe({"model": "smollm2-135m", "data": DATA, "stages": [{"eval": {}}], "output": "-"}).spec.data
        save_file({role: token_windows(tokenizer, getattr(spec, role).text_source(role), DATA[role]["samples"],
                                       DATA[role]["seq_len"]).contiguous() for role in DATA}, str(path))
    return path


def run_ours(out: Path, point: str, bits: int) -> dict:
    from compress import load, run_recipe
    from compress.run.recipe import parse_recipe

    os.environ["COMPRESS_GPTQ_CALIBRATION"] = "packed" if point == "ours-packed" else "dense"
    stages = [{"quantize": {"method": "gptq", "config": {"bits": bits, "group_size": GROUP}, "damp": 0.01}},
              {"export": {"format": "gptq", "verify": False}}]
    recipe = parse_recipe({"model": str(dense_model_dir(out)), "data": DATA, "stages": stages, "device": "cpu",
                           "output": str(out / "points" / point)})
    report = run_recipe(recipe, overwrite=True).reports[1]
    model = load(out / "points" / point / "checkpoint", dtype="float32")
    return {"point": point, "seconds": report.seconds, "gptq_seconds": report.metrics["gptq_seconds"],
            "ppl": evaluate_on(model, out)}


def evaluate_on(model, out: Path) -> float:
    from safetensors.torch import load_file

    from compress.execution.evaluate import perplexity

    return perplexity(model, load_file(str(windows_file(out)))["eval"])


def run_gptqmodel(out: Path, bits: int) -> dict:
    from compress import load

    point = out / "points" / "gptqmodel"
    result = gptqmodel_quantize(out, point, bits, windows_file(out), "gptqmodel")
    model = load(point / "checkpoint", dtype="float32")
    return {"point": "gptqmodel", "seconds": result["seconds"], "gptq_seconds": None, "ppl": evaluate_on(model, out)}


def markdown(rows: list[dict]) -> str:
    base = next(r for r in rows if r["point"] == "gptqmodel")
    lines = ["| point | quantize s | GPTQ s (ours: the layer walk) | quantize s / GPTQModel's | perplexity |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        gptq = "-" if r["gptq_seconds"] is None else f"{r['gptq_seconds']:.0f}"
        lines.append(f"| {r['point']} | {r['seconds']:.0f} | {gptq} | {r['seconds'] / base['seconds']:.2f}x | "
                     f"{r['ppl']:.3f} |")
    return "\n".join(lines) + "\n"


def point_row(args, point: str) -> dict:
    """A point's row, measured in its own process once (``points/NAME/row.json``: a rerun resumes)."""
    saved = args.out / "points" / point / "row.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    row = run_child(__file__, ["--out", str(args.out), "--bits", str(args.bits), "--point", point], point)
    saved.write_text(json.dumps(row))
    return row


def main() -> None:
    args = bench_args(__doc__.splitlines()[0], "out/bench/gptq_calibration", lambda parser: parser.add_argument(
        "--bits", type=int, default=4))
    if args.point:
        row = run_gptqmodel(args.out, args.bits) if args.point == "gptqmodel" else run_ours(args.out, args.point,
                                                                                         args.bits)
        print(child_result(row))  # noqa: T201 - the child's result line
        return
    windows_file(args.out)
    dense_model_dir(args.out)
    rows = [point_row(args, point) for point in POINTS]
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "results.md").write_text(markdown(rows))
    print(markdown(rows))  # noqa: T201 - the table is the script's output


if __name__ == "__main__":
    main()
