"""Checks that run before any weight is loaded (``compress validate``).

1. Cross-stage rules, from the recipe alone: ``export`` stages come last and write distinct paths;
   pruning stages (``prune``, ``loram``) come before any quantizing stage; stages that need
   calibration or evaluation data have it.
2. Each stage's own checks against the model's structure: the model is built from its config on the
   meta device (no weights), so a group size that does not fit or a selector that matches nothing is
   reported with the stage's location before minutes are spent loading.
3. With ``streaming: true``: every stage streams, and the model is a directory of safetensors files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import ModelError, RecipeError, brief
from .models import ModelSource, load_config, resolve_model
from .recipe import Recipe

PRUNING_STAGES = ("prune", "loram")


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
    paths: dict[str, int] = {}
    for entry in stages:
        if entry.name == "export":
            path = entry.config.path
            if path in paths:
                raise RecipeError(f"{entry.where}.path: {path!r} is already written by stages[{paths[path]}].export")
            paths[path] = entry.index
    first_quantizer = next((e for e in stages if e.stage.quantizes), None)
    if first_quantizer is not None:
        for entry in stages[first_quantizer.index:]:
            if entry.name in PRUNING_STAGES:
                raise RecipeError(f"{entry.where}: pruning must come before quantizing "
                                  f"({first_quantizer.where} quantizes)")
    for entry in stages:
        for role in entry.stage.needs_data:
            if getattr(recipe.spec.data, role) is None:
                raise RecipeError(f"{entry.where}: needs data.{role}")
    if recipe.spec.streaming:
        _check_streaming(recipe)
    for role in ("calibration", "eval"):
        spec = getattr(recipe.spec.data, role)
        if spec is not None and spec.path is not None and not Path(spec.path).is_file():
            raise RecipeError(f"data.{role}.path: {spec.path} does not exist")


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


def check_recipe(recipe: Recipe, skeleton: Skeleton | None = None) -> Skeleton:
    """All checks; returns the skeleton so callers can reuse it."""
    check_rules(recipe)
    skeleton = skeleton or build_skeleton(recipe)
    for entry in recipe.stages:
        if entry.stage.check is not None and skeleton.model is not None:
            entry.stage.check(recipe, entry, skeleton.model)
    return skeleton
