"""``compress plan``: memory plans for a model (every precision, every training method) or for a
recipe (each stage as it will run), the fits for a GPU size, rich tables and a stacked bar chart.

A recipe plan walks the stages with what each leaves behind (a packed base, LQ-LoRA's bit budget,
adapters, a pruned width: ``stage_memory.PlanState``) and asks each stage for its memory
(``Stage.memory``): training stages as their training breakdown, ``eval`` as an inference
deployment, ``quantize``/``lq_lora`` as the dense model they read. Nothing is loaded but the config.
"""

from __future__ import annotations

from dataclasses import replace

from ..dtypes import DTYPES
from .plan import GIB, INFERENCE_CANDIDATES, Architecture, best_inference_fit, inference_breakdown
from .plan_training import TRAINING_CANDIDATES, TrainingSetup, best_training_fit, candidate_setup, training_breakdown
from .stage_memory import PlanState, held

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


def _start(recipe) -> tuple[Architecture, PlanState]:
    """The recipe's architecture (from its config alone) and the plan state before its first stage."""
    from .plan import architecture_for

    width = DTYPES[recipe.spec.dtype].itemsize
    calibration = recipe.spec.data.calibration
    return architecture_for(recipe.spec.model), PlanState(TrainingSetup(compute_bytes=width, base_bytes=width),
                                                          eval_seq=recipe.spec.data.eval.seq_len,
                                                          calibration=(calibration.samples, calibration.seq_len))


def _rows(entry, arch: Architecture, state: PlanState) -> list[tuple[str, dict]]:
    """The stage's own memory rows (``Stage.memory``; none: the model as held), updating ``state``."""
    if entry.stage.memory is None:
        return [(entry.name, held(arch, state))]
    return entry.stage.memory(arch, entry.config, state)


def stage_rows(recipe, index: int) -> dict[str, dict]:
    """Stage ``index``'s rows: the stages before it are asked only for what they leave."""
    arch, state = _start(recipe)
    for entry in recipe.stages[:index]:
        _rows(entry, arch, state)
    return dict(_rows(recipe.stages[index], arch, state))


def recipe_plan(recipe, gpu_gib: float | None = None) -> dict:
    """Each stage's memory as the recipe will run it, and the peak."""
    arch, state = _start(recipe)
    stages = {f"{entry.index}: {label}": parts for entry in recipe.stages for label, parts in _rows(entry, arch, state)}
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
