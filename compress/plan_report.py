"""``compress plan``: memory plans for a model (every precision, every training method) or for a
recipe (each stage as it will run), the fits for a GPU size, rich tables and a stacked bar chart.

A recipe plan walks the stages with what each leaves behind (a packed base, LQ-LoRA's bit budget,
adapters, a pruned width) and asks ``plan`` / ``plan_training`` for the memory of each: training
stages as their training breakdown, ``eval`` as an inference deployment, ``quantize``/``lq_lora``
as the dense model they read. Nothing is loaded but the config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .chunked_loss import loss_slice_bytes
from .dtypes import DTYPES
from .plan import (GIB, INFERENCE_CANDIDATES, Architecture, best_inference_fit, calibration_breakdown,
                   inference_breakdown)
from .plan_training import (TRAINING_CANDIDATES, TrainingSetup, best_training_fit, candidate_setup, layer_shape_list,
                            training_breakdown)



def model_plan(arch: Architecture, model: str, batch: int, seq: int, gpu_gib: float | None,
               setup: TrainingSetup) -> dict:
    """Inference at every candidate precision and training with every candidate method."""
    inference = {name: inference_breakdown(arch, config, batch, seq) for name, config in INFERENCE_CANDIDATES.items()}
    training = {name: training_breakdown(arch, candidate_setup(arch, name, setup)) for name, _ in TRAINING_CANDIDATES}
    training["l4q-int4-g64"] = training_breakdown(arch, replace(setup, method="l4q"))
    plan = {"model": model, "params": arch.total_params(), "batch": batch, "seq": seq, "gpu_gib": gpu_gib,
            "training_setup": {"rank": setup.rank, "batch": setup.batch, "seq": setup.seq,
                               "checkpointing": setup.checkpointing, "optimizer": setup.optimizer},
            "inference": inference, "training": training}
    if gpu_gib is not None:
        plan["fit"] = {"inference": best_inference_fit(arch, gpu_gib, batch, seq),
                       "training": best_training_fit(arch, gpu_gib, setup)}
    return plan


@dataclass
class _State:
    """What the stages so far leave: the frozen base's format, adapters, pruning."""

    setup: TrainingSetup
    base_label: str = "dense"
    rank: int = 0
    eval_seq: int = 512
    calibration: tuple[int, int] = (128, 512)  # data.calibration (samples, seq_len)


def _training_setup(setup: TrainingSetup, config, method: str, rank: int) -> TrainingSetup:
    distill = getattr(config, "distill", None)
    return replace(setup, method=method, rank=rank, batch=config.batch_size, seq=config.seq_len,
                   optimizer=config.optimizer, checkpointing=config.gradient_checkpointing,
                   distill_top_k=distill.top_k if distill else 0)


def _prune_range(arch: Architecture, config) -> tuple[int, int]:
    if config.uniform:
        return 0, arch.layers
    return int(config.skip_first * arch.layers), arch.layers - config.skip_last


def _quantized(state: _State, config, label: str) -> None:
    state.setup = replace(state.setup, base=config, base_bits=None)
    state.base_label = label


def _calibration(arch: Architecture, state: _State) -> dict[str, int]:
    return calibration_breakdown(arch, *state.calibration, state.setup.compute_bytes)


def _stage_rows(arch: Architecture, entry, state: _State) -> list[tuple[str, dict]]:
    """(row label, breakdown) for one stage; updates ``state`` with what the stage leaves."""
    name, config = entry.name, entry.config
    held = training_breakdown(arch, replace(state.setup, method="lora", rank=state.rank, batch=1, seq=1))
    held = {"frozen_base": held["frozen_base"], "trainable": held["trainable"]}
    if name == "quantize":
        _quantized(state, config.config.to_config(), config.config.to_config().name)
        if config.method == "gptq":
            return [("quantize (gptq)", {**held, **_calibration(arch, state)})]
        return [(name, held)]
    if name == "lq_lora":
        bits = config.budget_bits
        if bits is None:
            numel = sum(o * i for shapes in layer_shape_list(arch, state.setup) for o, i in shapes.values())
            bits = config.budget_gib * GIB * 8 / numel  # the ILP's budget over the (possibly pruned) matrices
        state.setup = replace(state.setup, base=None, base_bits=bits)
        state.base_label, state.rank = f"LQ-LoRA {bits:.2f} bits", config.rank
        return [(name, {**held, **_calibration(arch, state)} if config.quantizer == "gptq" else held)]
    if name == "finetune":
        rank = config.lora.rank if config.lora is not None else state.rank
        method = "lora" if state.base_label == "dense" else "qlora"
        state.rank = rank
        setup = _training_setup(state.setup, config, method, rank)
        return [(f"finetune ({method}, {state.base_label})", training_breakdown(arch, setup))]
    if name == "l4q":
        setup = replace(_training_setup(state.setup, config, "l4q", config.lora.rank),
                        l4q=_uniform(config.bits, config.group_size))
        _quantized(state, _uniform(config.bits, config.group_size, config.zero_point == "float"),
                   f"int{config.bits}-g{config.group_size}")
        return [(name, training_breakdown(arch, setup))]
    if name == "prune":
        setup = replace(_training_setup(state.setup, config, "prune", config.lora.rank),
                        gradient_criterion=config.method == "gradient")
        rows = [(f"prune ({config.method})", training_breakdown(arch, setup))]
        start, end = _prune_range(arch, config)
        state.setup = replace(state.setup, prune_ratio=config.ratio, prune_start=start, prune_end=end)
        return rows
    if name == "loram":
        return _loram_rows(arch, config, state)
    if name == "eval":
        serving = inference_breakdown(arch, None, config.batch_size, state.eval_seq)
        width = state.setup.compute_bytes / 2  # inference_breakdown counts 16-bit values
        layer = serving["activations"] - 4 * config.batch_size * arch.vocab  # less decode's last-token logits
        return [("eval", {**held, "activations": layer * width + loss_slice_bytes(arch, config.batch_size,
                                                                                  state.eval_seq, width * 2),
                          "kv_cache": serving["kv_cache"] * width})]
    return [(name, held)]


def _loram_rows(arch: Architecture, config, state: _State) -> list[tuple[str, dict]]:
    from compress.quant import QuantConfig

    structured = config.prune.method in ("loraprune", "gradient", "magnitude", "random")
    start, end = _prune_range(arch, config.prune)
    small = replace(state.setup, prune_ratio=config.prune.ratio if structured else 0.0, prune_start=start,
                    prune_end=end)
    rows = [("loram (prune)", training_breakdown(arch, _training_setup(state.setup, config.prune, "prune",
                                                                       config.prune.lora.rank)))]
    if config.align_steps:
        rows.append(("loram (align, full)", training_breakdown(arch, replace(small, method="full"))))
    if config.quantize_small == "nf4":
        small = replace(small, base=QuantConfig.nf(4, 64, 8, 256, "float32"))
    elif config.quantize_small is not None:
        small = replace(small, base=config.quantize_small.to_config())
    train = _training_setup(small, config.train, "loram", config.train.lora.rank)
    rows.append(("loram (train small)", training_breakdown(arch, train)))
    state.rank = config.train.lora.rank
    return rows


def _uniform(bits: int, group: int, float_zero: bool = False):
    from compress.quant import QuantConfig

    return QuantConfig.uniform(bits, group, float_zero=float_zero)


def recipe_plan(recipe, gpu_gib: float | None = None) -> dict:
    """Each stage's memory as the recipe will run it, and the peak."""
    from .plan import architecture_for

    arch = architecture_for(recipe.spec.model)
    width = DTYPES[recipe.spec.dtype].itemsize
    calibration = recipe.spec.data.calibration
    state = _State(TrainingSetup(compute_bytes=width, base_bytes=width), eval_seq=recipe.spec.data.eval.seq_len,
                   calibration=(calibration.samples, calibration.seq_len))
    stages = {}
    for entry in recipe.stages:
        for label, parts in _stage_rows(arch, entry, state):
            stages[f"{entry.index}: {label}"] = parts
    peak = max(stages, key=lambda k: sum(stages[k].values()))
    plan = {"model": recipe.spec.model, "params": arch.total_params(), "dtype": recipe.spec.dtype,
            "gpu_gib": gpu_gib, "stages": stages, "peak_stage": peak, "peak_gib": sum(stages[peak].values()) / GIB}
    if gpu_gib is not None:
        plan["fits"] = plan["peak_gib"] <= gpu_gib
    return plan


PART_COLORS = {"frozen_base": "#4c72b0", "codes": "#4c72b0", "scales": "#55a868", "zeros": "#8172b2",
               "second_level": "#937860", "dense": "#64b5cd", "trainable": "#dd8452", "adapters": "#dd8452",
               "gradients": "#c44e52", "optimizer": "#8c8c8c", "activations": "#ccb974", "kv_cache": "#da8bc3",
               "transient": "#bbbbbb"}


SHORT = {"frozen_base": "base", "trainable": "trained", "gradients": "grads", "optimizer": "optim",
         "activations": "activ", "kv_cache": "kv", "transient": "temp", "second_level": "2nd lvl"}


def plan_sections(plan: dict) -> list[tuple[str, dict[str, dict]]]:
    """(title, {row: parts}) of a model plan (inference, training) or a recipe plan (stages)."""
    if "stages" in plan:
        return [(f"{plan['model']} ({plan['dtype']}): memory per stage", plan["stages"])]
    setup = plan["training_setup"]
    training = (f"training, batch {setup['batch']} x {setup['seq']}, LoRA rank {setup['rank']}, {setup['optimizer']}"
                + (", checkpointing" if setup["checkpointing"] else ""))
    return [(f"{plan['model']}: inference, batch {plan['batch']} x {plan['seq']}", plan["inference"]),
            (f"{plan['model']}: {training}", plan["training"])]


def plan_tables(plan: dict) -> list:
    """rich Tables (GiB per part, total, fit) for each section of a plan."""
    from rich.table import Table

    tables = []
    for title, rows in plan_sections(plan):
        parts = [p for p in PART_COLORS if any(r.get(p) for r in rows.values())]
        table = Table(title=f"{title} (GiB)")
        table.add_column("", no_wrap=True)
        for part in [*parts, "total"] + (["fits"] if plan.get("gpu_gib") else []):
            table.add_column(SHORT.get(part, part), justify="right")
        for label, row in rows.items():
            total = sum(row.values()) / GIB
            fit = ["yes" if total <= plan["gpu_gib"] else "no"] if plan.get("gpu_gib") else []
            table.add_row(label, *(f"{row.get(p, 0) / GIB:.2f}" for p in parts), f"{total:.2f}", *fit)
        tables.append(table)
    return tables


def plan_chart(plan: dict, path) -> None:
    """A stacked horizontal bar per row (GiB by part), one panel per section, GPU size as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = plan_sections(plan)
    heights = [max(1.5, 0.45 * len(rows) + 1) for _, rows in sections]
    figure, axes = plt.subplots(len(sections), 1, figsize=(10.5, sum(heights)), squeeze=False,
                                gridspec_kw={"height_ratios": heights})
    for axis, (title, rows) in zip(axes[:, 0], sections):
        labels, left = list(rows), [0.0] * len(rows)
        for part, color in PART_COLORS.items():
            values = [rows[label].get(part, 0) / GIB for label in labels]
            if any(values):
                axis.barh(labels, values, left=left, color=color, label=part.replace("_", " "))
                left = [a + b for a, b in zip(left, values)]
        if plan.get("gpu_gib"):
            axis.axvline(plan["gpu_gib"], color="black", linestyle="--", linewidth=1, label=f"{plan['gpu_gib']:g} GiB")
        axis.invert_yaxis()
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("GiB")
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
