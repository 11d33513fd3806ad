"""Quality at 2-4 bits against the peers at their defaults, on text no method saw (issues 23, 40).

    .venv/bin/python benchmarks/heldout.py [--model smollm2-135m|gemma3-270m] [--out DIR] [--results FILE]
                                           [--only NAME ...]

Needs the GPTQModel side venv (``make interop-venv``) and, once, ``apt-get download`` of Debian's
python3.11-doc (``heldout_corpus.py``, run by this script). ``--model``: SmolLM2-135M (default; out
``out/bench/heldout``) or Gemma-3-270M (out ``out/bench/heldout-gemma3-270m``), each with its own
grid (``GRIDS``, below). Every point runs in its own process, one after another; finished points are
kept in ``--results`` (one JSON row each, default ``OUT/results.jsonl``) and skipped by a rerun, so the
command resumes where it stopped; a point killed half-way continues from its saved stages and L4Q's
mid-training checkpoints (``--resume``; every ``save_every`` steps), and its row says ``resumed``
(its seconds then miss the steps that were lost and run again).

Text: calibration and training windows from the corpus's train documents (128 x 512 tokens for
every calibrated method); perplexity on 64 x 512 tokens of its eval documents (``in-domain``: same
domain, disjoint documents) and on 32 x 512 tokens of the stdlib eval split (``stdlib``: out of
domain, Python source). No method sees either eval set.

SmolLM2's points, for int{4,3,2}, group 64 and 128, symmetric and asymmetric:

- ``gptq``: our quantize stage at its defaults (only bits, group and sym set);
- ``gptqmodel``: GPTQModel 7.6.0 at its defaults (only bits, group and sym set). Our GPTQ's
  defaults are GPTQModel's (damp 0.05 raised by 0.01 on failure, group-aware order, no scale
  search), so this row is also GPTQModel "with our settings";
- ``rtn``: our round-to-nearest; plus ``fp32`` and bitsandbytes ``bnb-nf4`` (double quant);
- ``lqlora-r0`` / ``lqlora-r16``: our LQ-LoRA with ``quantizer: gptq`` at budgets 2.5 / 3.0 / 3.5
  bits (rank 16: 16-bit adapters, counted in the bits), and rank 0 at 3.29 (uniform int3 g64's own
  bits from the files, 3.342, less g_idx, which the budget does not count: mixed against uniform
  precision at equal size);
- ``l4q``: our GPTQ at int3 g64 asym, then L4Q (``L4Q_TUNE`` steps on the train documents), without
  and with distillation from the fp32 model (``distill: {}``: weight 0.5, temperature 2, top 64).

Gemma-3-270M's points (issue 40; its GGUF stores the projections at Q5_0/Q4_K/Q6_K, so 4 bits and
below are lossy there, unlike SmolLM2's Q4_1 source): ``gptq`` and ``gptqmodel`` at int{4,3} g128
sym and asym; ``rtn`` at the same four and int2 g128 asym; ``gptq`` int2 g128 asym (the uniform
curve's low end); ``fp32``; ``bnb-nf4``; ``lqlora-r0`` at 2.5 / 3.0 / 3.25 / 3.5 bits, and
``lqlora-r0-outputs`` at the same budgets (``fisher: outputs``: the output error's rows weighted by
the Fisher of each matrix's outputs, not by the weight Fisher's row means), ``lqlora-r0-measured``
at the same budgets (``measured_windows: 2``: each fused group's costs per bit width rescaled by the
KL its GPTQ reference causes on 2 calibration windows over the one its costs predict),
``lqlora-r0-measured-layer`` (``measured_probe: layer``: a decoder layer's matrices probed together)
and ``lqlora-r0-measured-g128`` (``group_sizes: [128]``: the grid cut to the probed group size, so
every cost the ILP compares is a measured one); ``l4q`` from GPTQ int3 g128 asym, without and with
distillation.

Both models also get ``awq-rtn`` and ``awq-gptq`` at int{4,3} g128 sym and asym (issue 41: our AWQ,
``quantize: {method: awq, then: rtn|gptq}`` at its defaults), beside the same configs' ``rtn`` and
``gptq`` rows.

A point whose group does not divide every projection's input features (SmolLM2's 576 at group 128)
keeps a partial last group and exports ``native`` (GPTQ engines need whole groups); GPTQModel's
group-128 checkpoints are read by our loader as it reads its others. Bits per parameter are counted
from the checkpoint files (every tensor of the linear layers: codes, scales, zeros, g_idx,
adapters). Seconds: the quantization alone (our stages' seconds; GPTQModel's ``quantize()`` call),
with the process's CPU seconds beside them and the load average at the start, because a shared
machine moves wall time. An LQ-LoRA point starts from the cost entries its rank's other budgets
computed (they do not depend on the budget; ``lqlora-r0-measured*`` also from ``lqlora-r0``'s, whose
costs they rescale, where the grid is the same, and references and probes from ``lqlora-r0-measured``'s
and their own budgets); its row then says how many files it copied in and the cost table's seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from child import bench_args, child_result, run_child
from peers import dense_model_dir, directory_bytes, linear_names, linear_tensor_bits, quantize_bnb, side

HERE = Path(__file__).resolve().parent
WINDOWS = {"calibration": ("train", 128), "in-domain": ("eval", 64)}
STDLIB_EVAL = 32
SEQ_LEN = 512
GRID = [(bits, group, sym) for bits in (4, 3, 2) for group in (64, 128) for sym in (True, False)]
GEMMA_GRID = [(bits, 128, sym) for bits in (4, 3) for sym in (True, False)]
MEASURED_WINDOWS = 2  # lqlora-r0-measured*: calibration windows per probe (groups x widths probes)
L4Q_TUNE = {"steps": 64, "lr": 2.0e-4, "batch_size": 4, "grad_accum": 1, "seq_len": 512, "save_every": 4}
log = logging.getLogger("heldout")


@dataclass(frozen=True)
class Point:
    method: str
    bits: float | None = None  # a budget for lqlora
    group: int = 64
    sym: bool = False
    distill: bool = False  # l4q: with the KL to the fp32 model's predictions (``compress.training.distill`` defaults)

    @property
    def name(self) -> str:
        if self.method in ("fp32", "bnb-nf4"):
            return self.method
        if self.method.startswith("lqlora"):
            return f"{self.method}-{self.bits:g}"
        name = f"{self.method}-int{self.bits:g}-g{self.group}-{'sym' if self.sym else 'asym'}"
        return name + ("-distill" if self.distill else "")


def smollm2_points() -> list[Point]:
    """SmolLM2's points, the acceptance pairs first (so a stopped run has the verdict's rows first)."""
    pairs = [Point(m, b, g, s) for b, g, s in GRID if b != 2 for m in ("gptq", "gptqmodel")]
    rest = [Point("fp32")] + [Point("rtn", b, g, s) for b, g, s in GRID]
    rest += [Point(m, b, g, s) for b, g, s in GRID if b == 2 for m in ("gptq", "gptqmodel")]
    rest += [Point("bnb-nf4", 4)] + [Point(f"lqlora-r{r}", budget) for r in (0, 16) for budget in (3.0, 2.5, 3.5)]
    rest += [Point("lqlora-r0", 3.29)]
    return pairs + rest + [Point("l4q", 3, 64, False, distill) for distill in (False, True)] + awq_points()


def gemma3_points() -> list[Point]:
    """Gemma-3-270M's points: fp32 and RTN first (minutes each; every reduction over RTN needs them),
    then the GPTQ pairs, the uniform curve's int2 end, NF4, LQ-LoRA rank 0, L4Q (hours each)."""
    first = [Point("fp32")] + [Point("rtn", b, g, s) for b, g, s in GEMMA_GRID + [(2, 128, False)]]
    pairs = [Point(m, b, g, s) for b, g, s in GEMMA_GRID for m in ("gptq", "gptqmodel")]
    rest = [Point("gptq", 2, 128, False), Point("bnb-nf4", 4)]
    rest += [Point(method, budget) for method in ("lqlora-r0-measured-g128", "lqlora-r0-measured",
                                                  "lqlora-r0-measured-layer", "lqlora-r0", "lqlora-r0-outputs")
             for budget in (3.25, 3.0, 2.5, 3.5)]
    return first + pairs + rest + [Point("l4q", 3, 128, False, distill) for distill in (False, True)] + awq_points()


def awq_points() -> list[Point]:
    """AWQ then RTN / GPTQ at 4 and 3 bits, g128, sym and asym (issue 41), beside the same grid's
    RTN and GPTQ rows."""
    return [Point(f"awq-{then}", bits, 128, sym) for bits in (4, 3) for sym in (True, False) for then in ("rtn", "gptq")]


GRIDS = {"smollm2-135m": (GRID, smollm2_points), "gemma3-270m": (GEMMA_GRID, gemma3_points)}
"""{model: (the GPTQ-against-GPTQModel grid, its points)}"""


def points(model_name: str) -> list[Point]:
    return GRIDS[model_name][1]()


def corpus(out: Path) -> dict[str, Path]:
    paths = {split: out / "corpus" / f"{split}.jsonl" for split in ("train", "eval")}
    if not all(p.is_file() for p in paths.values()):
        subprocess.run([sys.executable, str(HERE / "heldout_corpus.py"), "--out", str(out / "corpus")], check=True)
    return paths


def data_spec(out: Path) -> dict:
    """The recipe ``data:`` of every calibrated point: the corpus's train documents."""
    split, samples = WINDOWS["calibration"]
    return {"calibration": {"path": str(corpus(out)[split]), "field": "text", "samples": samples, "seq_len": SEQ_LEN}}


def windows_file(out: Path, model_name: str = "smollm2-135m") -> Path:
    """Calibration, in-domain and stdlib eval windows as token ids of the model's tokenizer (written once)."""
    path = out / "windows.safetensors"
    if not path.is_file():
        from safetensors.torch import save_file

        from compress.models.data import TextSource, token_windows
        from compress.models.sources import load_model, resolve_model

        _, tokenizer = load_model(resolve_model(model_name), "float32")
        files = corpus(out)
        windows = {role: token_windows(tokenizer, TextSource("file", split, str(files[split])), samples, SEQ_LEN)
                   for role, (split, samples) in WINDOWS.items()}
        windows["stdlib"] = token_windows(tokenizer, TextSource("stdlib", "eval"), STDLIB_EVAL, SEQ_LEN)
        save_file({k: v.contiguous() for k, v in windows.items()}, str(path))
    return path


def perplexities(model, out: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    from compress.execution.evaluate import perplexity

    windows = load_file(str(windows_file(out)))
    return {"ppl": perplexity(model, windows["in-domain"]), "ppl_stdlib": perplexity(model, windows["stdlib"])}


def our_stages(point: Point) -> list[dict]:
    quant = {"type": "uniform", "bits": int(point.bits), "group_size": point.group, "sym": point.sym}
    if point.method in ("rtn", "gptq"):
        return [{"quantize": {"method": point.method, "config": quant}}]
    if point.method.startswith("awq-"):
        return [{"quantize": {"method": "awq", "then": point.method.removeprefix("awq-"), "config": quant}}]
    if point.method.startswith("lqlora"):
        rank, _, variant = point.method.removeprefix("lqlora-r").partition("-")
        lq_lora = {"rank": int(rank), "alpha": 2 * int(rank) if int(rank) else 16, "budget_bits": point.bits,
                   "grid": "gptq", "quantizer": "gptq"}
        return [{"lq_lora": lq_lora | VARIANTS[variant]}]
    tune = dict(L4Q_TUNE, bits=int(point.bits), group_size=point.group, lora={"rank": 16, "alpha": 32})
    l4q = tune | ({"distill": {}} if point.distill else {})
    return [{"quantize": {"method": "gptq", "config": quant}}, {"l4q": l4q}]


VARIANTS = {"": {}, "outputs": {"fisher": "outputs"}, "measured": {"measured_windows": MEASURED_WINDOWS},
            "measured-layer": {"measured_windows": MEASURED_WINDOWS, "measured_probe": "layer"},
            "measured-g128": {"measured_windows": MEASURED_WINDOWS, "group_sizes": [128]}}
"""LQ-LoRA's variants by the method's suffix (``lqlora-r0-outputs``: ``outputs``)."""


def checkpoint_row(model, directories: list[Path], out: Path) -> dict:
    names = linear_names(model)
    return {**perplexities(model, out), "bits_per_param": linear_tensor_bits(directories, names),
            "disk_mib": sum(directory_bytes(d) for d in directories) / 2**20}


def seed_cost_cache(out: Path, point: Point, where: Path) -> int:
    """LQ-LoRA's cost entries do not depend on the budget: a point starts with the entries that the
    same rank's other budgets left (``.cache/lq_lora``, keyed by weight, Fisher, Hessian, settings and
    the grid's configs, so only identical entries are reused, and only from points with the same grid);
    ``-measured`` points also take the plain method's entries (same grid), and their references and
    probes, ``.cache/lq_lora_measured``, from each other. Returns how many files it copied in."""
    if not point.method.startswith("lqlora"):
        return 0
    found = 0
    base = point.method.partition("-measured")[0]
    for method in dict.fromkeys([point.method] + ([f"{base}-measured", base] if base != point.method else [])):
        others = [d for d in (out / "points").glob(f"{method}-*") if d != where
                  and d.name.removeprefix(f"{method}-").replace(".", "").isdigit()]  # not lqlora-r0-outputs-*
        seeded = SEEDED if _grid(method) == _grid(point.method) else SEEDED[1:]  # entries' keys hold the grid
        for other, pattern in ((o, p) for o in others for p in seeded):
            for file in other.glob(pattern):
                target = where / file.relative_to(other)
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(file, target.with_name(f"{target.name}.partial"))  # a kill leaves no half file
                    os.replace(target.with_name(f"{target.name}.partial"), target)
                    found += 1
    return found


def _grid(method: str) -> list[int] | None:
    """The group sizes an LQ-LoRA method's grid is cut to (None: the whole grid)."""
    return VARIANTS[method.removeprefix("lqlora-r").partition("-")[2]].get("group_sizes")


SEEDED = (".cache/lq_lora/*.json", ".cache/lq_lora_measured/*.json", ".cache/lq_lora_measured/references/*.safetensors")
"""What an LQ-LoRA point takes from its other budgets' directories (``seed_cost_cache``)."""


def input_features(model_dir: Path) -> set[int]:
    """The input widths of the decoder's projections, from the dense directory's tensor headers."""
    from safetensors import safe_open

    widths = set()
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            widths |= {handle.get_slice(k).get_shape()[1] for k in handle.keys() if k.endswith("_proj.weight")}
    return widths


def run_ours(out: Path, point: Point, where: Path, model_name: str) -> dict:
    """Our recipe for the point, exported (native where a group is partial), reloaded from the files."""
    from compress import load, load_adapter, run_recipe
    from compress.run.recipe import parse_recipe

    whole = all(f % point.group == 0 for f in input_features(dense_model_dir(out, model_name)))
    stages = our_stages(point) + [{"export": {"format": "gptq" if whole else "native"}}]
    recipe = parse_recipe({"model": model_name, "dtype": "float32", "data": data_spec(out), "seed": 0,
                           "stages": stages, "output": str(where)})
    resumed = any((where / entry).is_dir() for entry in (".stages", ".cache"))  # an earlier attempt was killed
    seeded = seed_cost_cache(out, point, where)
    load_avg = os.getloadavg()[0]
    cpu = time.process_time()
    reports = run_recipe(recipe, resume=True).reports  # identical files to an uninterrupted run
    cpu = time.process_time() - cpu
    work = [r for r in reports[1:] if r.name != "export"]  # reports[0]: loading
    model = load(where / "checkpoint", dtype="float32")
    directories = [where / "checkpoint"]
    if (where / "checkpoint-adapter").is_dir():
        directories.append(where / "checkpoint-adapter")
        model = load_adapter(model, where / "checkpoint-adapter")
    costs = {"cost_entries_reused": seeded, "cost_table_seconds": work[0].metrics.get("cost_table_seconds")}
    extra = (costs if seeded else {}) | ({"resumed": True} if resumed else {})
    return {**checkpoint_row(model, directories, out), "seconds": sum(r.seconds for r in work), "cpu_seconds": cpu,
            "load_avg": load_avg, "peak_rss_mib": max(r.peak_rss_mib for r in work), **extra}


def run_gptqmodel(out: Path, point: Point, where: Path, model_name: str) -> dict:
    from compress import load

    where.mkdir(parents=True, exist_ok=True)
    job = {"action": "quantize", "model_dir": str(dense_model_dir(out, model_name)),
           "windows": str(windows_file(out)), "out": str(where / "checkpoint"), "bits": int(point.bits),
           "group_size": point.group, "sym": point.sym, "job_file": str(where / "job.json")}
    load_avg = os.getloadavg()[0]
    result = side(job, f"GPTQModel {point.name}")
    model = load(where / "checkpoint", dtype="float32")
    return {**checkpoint_row(model, [where / "checkpoint"], out), "seconds": result["seconds"],
            "cpu_seconds": result.get("cpu_seconds"), "load_avg": load_avg, "peak_rss_mib": result["peak_rss_mib"]}


def run_fp32(out: Path, model_name: str) -> dict:
    from compress.models.sources import load_model, resolve_model

    dense = dense_model_dir(out, model_name)
    model, _ = load_model(resolve_model(str(dense)), "float32")
    return {**checkpoint_row(model, [dense], out), "seconds": 0.0}


def run_bnb(out: Path, where: Path, model_name: str) -> dict:
    model, row = quantize_bnb(out, where, model_name)
    return {**perplexities(model, out), **row}


def run_point(out: Path, point: Point, model_name: str) -> dict:
    where = out / "points" / point.name
    where.mkdir(parents=True, exist_ok=True)
    runners = {"fp32": lambda: run_fp32(out, model_name), "bnb-nf4": lambda: run_bnb(out, where, model_name),
               "gptqmodel": lambda: run_gptqmodel(out, point, where, model_name)}
    row = runners.get(point.method, lambda: run_ours(out, point, where, model_name))()
    return {"name": point.name, **asdict(point), **row}


def claim_out(out: Path, model_name: str) -> None:
    """Tie ``out`` to one model (its windows and dense directory are that model's): a second model
    there stops with one line."""
    marker = out / "model.txt"
    if marker.is_file() and marker.read_text().strip() != model_name:
        raise SystemExit(f"{out} holds {marker.read_text().strip()}'s points; give --out for {model_name}")
    marker.write_text(model_name + "\n")


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(GRIDS), default="smollm2-135m", help="the model and its grid")


def model_option() -> str:
    """``--model``, read before the other options (the default ``--out`` depends on it)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_model_option(parser)
    return parser.parse_known_args()[0].model


def default_out(model_name: str) -> str:
    """The benchmark's directory for a model (corpus, windows, fp32 twin, points)."""
    return "out/bench/heldout" if model_name == "smollm2-135m" else f"out/bench/heldout-{model_name}"


def main() -> None:
    def options(parser):
        add_model_option(parser)
        parser.add_argument("--only", nargs="*", help="point names to run (default: every point)")
        parser.add_argument("--results", type=Path, help="the rows file (default: OUT/results.jsonl)")

    model_name = model_option()
    args = bench_args(__doc__.splitlines()[0], default_out(model_name), options)
    if args.point:
        point = Point(**json.loads(args.point))
        print(child_result(run_point(args.out, point, model_name)))
        return
    claim_out(args.out, model_name)
    windows_file(args.out, model_name)
    dense_model_dir(args.out, model_name)
    results = args.results or args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    for point in points(model_name):
        if any(r["name"] == point.name for r in rows) or (args.only and point.name not in args.only):
            continue
        log.info("point %s", point.name)
        try:
            child_args = ["--out", str(args.out), "--model", model_name, "--point", json.dumps(asdict(point))]
            row = run_child(__file__, child_args, point.name)
        except SystemExit as failure:  # one failed point is reported and left for a rerun; the rest go on
            log.error("%s", failure)
            continue
        rows.append({**row, "commit": commit(), "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        with results.open("a") as handle:  # appended: rows another run wrote meanwhile stay
            handle.write(json.dumps(rows[-1], sort_keys=True) + "\n")
    log.info("%d rows in %s; tables: benchmarks/heldout_tables.py %s", len(rows), results, results)


if __name__ == "__main__":
    main()
