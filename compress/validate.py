"""Checks that run before any weight is loaded (``compress validate``).

1. Cross-stage rules, from the recipe alone: ``export`` stages come last and write distinct paths
   inside ``output`` that are free or ours (``compress.output_paths``); pruning stages (``prune``,
   ``loram``) and ``lq_lora`` come before any quantizing stage; stages that need calibration or
   evaluation data have it.
2. Each stage's own checks against the model's structure: the model is built from its config on the
   meta device (no weights), so a group size that does not fit or a selector that matches nothing is
   reported with the stage's location before minutes are spent loading; so is a LoRA rank above
   min(in, out) of a layer it adapts.
3. With ``streaming: true``: every stage streams, and the model is a directory of safetensors files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel
from torch import nn

from .data import file_problem
from .errors import ModelError, RecipeError, brief
from .models import ModelSource, load_config, resolve_model
from .output_paths import check_export_paths, check_output
from .recipe import Recipe
from .targets import select_linears

PRUNING_STAGES = ("prune", "loram")
DENSE_ONLY_STAGES = ("lq_lora",)  # they need every selected weight still dense


@dataclass
class Skeleton:
    """The model's structure without weights, for stage checks."""

    source: ModelSource
    config: object
    model: nn.Module


def check_rules(recipe: Recipe) -> None:
    stages = recipe.stages
    first_export = next((e.index for e in stages if e.name == "export"), None)
    if first_export is not None:
        for entry in stages[first_export:]:
            if entry.name != "export":
                raise RecipeError(f"{entry.where}: must come before stages[{first_export}].export "
                                  "(export stages are last)")
    check_output(recipe.output)
    check_export_paths(recipe.output, export_paths(recipe))
    first_quantizer = next((e for e in stages if e.stage.quantizes), None)
    if first_quantizer is not None:
        for entry in stages[first_quantizer.index + 1:]:
            if entry.name in PRUNING_STAGES:
                raise RecipeError(f"{entry.where}: pruning must come before quantizing "
                                  f"({first_quantizer.where} quantizes)")
            if entry.name in DENSE_ONLY_STAGES:
                raise RecipeError(f"{entry.where}: decomposes dense weights, but {first_quantizer.where} "
                                  "quantizes them first; put it before any quantizing stage (or drop one)")
    for entry in stages:
        for role in entry.stage.needs_data:
            if getattr(recipe.spec.data, role) is None:
                raise RecipeError(f"{entry.where}: needs data.{role}")
    if recipe.spec.streaming:
        _check_streaming(recipe)
    for role in ("calibration", "eval"):
        spec = getattr(recipe.spec.data, role)
        problem = file_problem(Path(spec.path)) if spec is not None and spec.path is not None else None
        if problem:
            raise RecipeError(f"data.{role}.path: {spec.path} {problem}")


def export_paths(recipe: Recipe) -> list[tuple[str, str]]:
    """(where, relative path) of every directory the recipe's exports write: each ``path``, and the
    PEFT adapter's when it is named or an earlier stage leaves adapters."""
    found = []
    for entry in recipe.stages:
        if entry.name != "export":
            continue
        config = entry.config
        found.append((f"{entry.where}.path", config.path))
        adapters = any(e.stage.leaves_adapters is not None and e.stage.leaves_adapters(e.config)
                       for e in recipe.stages[:entry.index])
        if config.adapters == "peft" and (config.adapter_path is not None or adapters):
            found.append((f"{entry.where}.adapter_path", config.adapter_dir()))
    return found


def _check_streaming(recipe: Recipe) -> None:
    for entry in recipe.stages:
        if entry.stage.streaming is None:
            names = sorted({s.name for s in _registry().values() if s.streaming is not None})
            raise RecipeError(f"{entry.where}: does not run with streaming: true (stages that stream: "
                              f"{', '.join(names)})")
        reason = entry.stage.streaming(entry.config)
        if reason:
            raise RecipeError(f"{entry.where}: does not run with streaming: true: {reason}")
    source = resolve_model(recipe.spec.model)
    if source.kind not in ("hf", "checkpoint"):
        raise RecipeError(f"streaming: true reads a model's safetensors files one layer at a time; model "
                          f"{recipe.spec.model!r} is a {source.kind} model (export it as a native or hf "
                          "checkpoint first)")


def _registry() -> dict:
    from .stages import STAGES

    return STAGES


def build_skeleton(recipe: Recipe) -> Skeleton:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    source = resolve_model(recipe.spec.model)
    config = load_config(source)
    if source.kind == "checkpoint":
        from .checkpoint.load import build_model, read_layout

        layout = read_layout(source.path, verify=False)
        if layout.format == "gptq" or any(shape is None for _, shape in layout.modules.values()):
            return Skeleton(source, config, None)
        return Skeleton(source, config, build_model(layout.config, layout.modules, layout.manifest.get("layer_widths")
                                                    if layout.manifest else None))
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # a config whose values no model can be built from
        raise ModelError(f"model: {recipe.spec.model}: its config does not describe a model that can be built: "
                         f"{type(err).__name__}: {brief(err)}") from None
    return Skeleton(source, config, model)


def low_rank_specs(config: BaseModel, where: str) -> Iterator[tuple[str, BaseModel]]:
    """(place, mapping) of every mapping in a stage config that puts a rank-``rank`` adapter on the
    layers its ``targets`` / ``ignore`` select (``lora:`` blocks, ``lq_lora`` itself), nested ones too."""
    if all(key in type(config).model_fields for key in ("rank", "targets", "ignore")):
        yield where, config
    for key in type(config).model_fields:
        value = getattr(config, key)
        if isinstance(value, BaseModel):
            yield from low_rank_specs(value, f"{where}.{key}")


def check_ranks(recipe: Recipe, model: nn.Module) -> None:
    """A LoRA rank is at most min(in, out) of every layer it adapts (a larger one only costs memory)."""
    for entry in recipe.stages:
        for where, spec in low_rank_specs(entry.config, entry.where):
            layers = select_linears(model, spec.targets, spec.ignore)
            if not layers or not spec.rank:
                continue
            name, layer = min(layers, key=lambda item: min(item[1].in_features, item[1].out_features))
            limit = min(layer.in_features, layer.out_features)
            if spec.rank > limit:
                raise RecipeError(f"{where}.rank: {spec.rank} is above {limit}, the smaller side of {name} "
                                  f"({layer.out_features} x {layer.in_features}); a rank is at most min(in, out) "
                                  "of every layer it adapts")


def check_recipe(recipe: Recipe, skeleton: Skeleton | None = None) -> Skeleton:
    """All checks; returns the skeleton so callers can reuse it."""
    check_rules(recipe)
    skeleton = skeleton or build_skeleton(recipe)
    for entry in recipe.stages:
        if entry.stage.check is not None and skeleton.model is not None:
            entry.stage.check(recipe, entry, skeleton.model)
    if skeleton.model is not None:
        check_ranks(recipe, skeleton.model)
    return skeleton
