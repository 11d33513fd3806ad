"""Checks that run before any weight is loaded (``compress validate``).

1. The recipe's own rules (``check_order``, all that ``compress plan`` needs): ``export`` stages come
   last; pruning stages (``prune``, ``loram``) come before any quantizing stage; stages that need
   evaluation data have it. Then the ``device`` asked for exists on this machine.
2. What it reads and writes (``check_files``): the output can be made; exports write distinct paths
   inside it that are free or ours and never the model being read (``compress.checkpoint.output_paths``); data
   files exist; with ``streaming: true`` every stage streams and the model is a directory of
   safetensors files.
3. The model's architecture is one compress supports (``compress.models.architectures``). Each stage's own
   checks against the model's structure: the model is built from its config on the
   meta device (no weights), so a group size that does not fit or a selector that matches nothing is
   reported with the stage's location before minutes are spent loading; so is a LoRA rank above
   min(in, out) of a layer it adapts, or an ``lq_lora`` whose every layer an earlier stage quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..checkpoint.formats import FORMATS, fuses_projections
from ..checkpoint.output_paths import check_export_paths, check_output
from ..errors import ModelError, RecipeError, brief
from ..execution.device import resolve_device
from ..model_state import ModelState
from ..models.architectures import architecture_of
from ..models.data import file_problem
from ..models.sources import ModelSource, load_config, resolve_model
from ..targets import select_linears
from .recipe import Recipe

PRUNING_STAGES = ("prune", "loram")
DENSE_ONLY_STAGES = ("lq_lora",)  # they need every selected weight still dense


@dataclass
class Skeleton:
    """The model's structure without weights, for stage checks."""

    source: ModelSource
    config: object
    model: nn.Module


def check_rules(recipe: Recipe) -> None:
    """Every check that needs no model: the recipe's own rules, then what it reads and writes."""
    check_order(recipe)
    resolve_device(recipe.spec.device)  # a GPU asked for is here
    check_files(recipe)


def check_order(recipe: Recipe) -> None:
    """Rules of the recipe alone (``compress plan`` checks only these: nothing on disk matters)."""
    stages = recipe.stages
    first_export = next((e.index for e in stages if e.name == "export"), None)
    if first_export is not None:
        for entry in stages[first_export:]:
            if entry.name != "export":
                raise RecipeError(f"{entry.where}: must come before stages[{first_export}].export "
                                  "(export stages are last)")
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


def check_files(recipe: Recipe) -> None:
    """The output can be written, exports replace only what is ours, the data files are there."""
    check_output(recipe.output)
    model_dir = Path(recipe.spec.model).expanduser()
    check_export_paths(recipe.output, export_paths(recipe), model_dir if model_dir.is_dir() else None)
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
    if not source.streams:
        raise RecipeError(f"streaming: true reads a model's safetensors files one layer at a time; model "
                          f"{recipe.spec.model!r} is a {source.kind} model (export it as a native or hf "
                          "checkpoint first)")


def _registry() -> dict:
    from ..stages import STAGES

    return STAGES


def build_skeleton(recipe: Recipe) -> Skeleton:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    source = resolve_model(recipe.spec.model)
    config = load_config(source)
    architecture_of(config, f"model: {recipe.spec.model}")
    if source.kind == "checkpoint":
        from ..checkpoint.load import build_model, read_layout

        layout = read_layout(source.path, verify=False)
        skeleton = FORMATS[layout.format].validate_with_skeleton
        if not skeleton or any(shape is None for _, shape in layout.modules.values()):
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


def check_ranks(recipe: Recipe, model: nn.Module) -> None:
    """A LoRA rank is at most min(in, out) of every layer it adapts (a larger one only costs memory);
    each stage says which ranks it puts on which layers (``Stage.low_rank``)."""
    for entry in recipe.stages:
        for key, rank, targets, ignore in entry.stage.low_rank(entry.config) if entry.stage.low_rank else []:
            layers = select_linears(model, targets, ignore)
            if not layers or not rank:
                continue
            name, layer = min(layers, key=lambda item: min(item[1].in_features, item[1].out_features))
            limit = min(layer.in_features, layer.out_features)
            if rank > limit:
                raise RecipeError(f"{entry.where}.{key}: {rank} is above {limit}, the smaller side of {name} "
                                  f"({layer.out_features} x {layer.in_features}); a rank is at most min(in, out) "
                                  "of every layer it adapts")


def check_export(entry, state: ModelState) -> None:
    """The export's format can hold the model as the recipe leaves it (``Format.problems``); the
    error names the stage that made it so."""
    refusal = FORMATS[entry.config.format].refusal(state, entry.where)
    if refusal:
        raise RecipeError(refusal)


def check_dense_left(recipe: Recipe, model: nn.Module) -> None:
    """A stage that needs dense weights (``lq_lora``) finds some among those it selects, after the
    layers that earlier quantizing stages select."""
    quantized: set[str] = set()
    for entry in recipe.stages:
        selected = {name for name, _ in select_linears(model, entry.config.targets, entry.config.ignore)} \
            if entry.stage.quantizes else set()
        if entry.name in DENSE_ONLY_STAGES and selected and selected <= quantized:
            earlier = next(e for e in recipe.stages[:entry.index] if e.stage.quantizes)
            raise RecipeError(f"{entry.where}: decomposes dense weights, but every layer it selects is quantized "
                              f"before it (by {earlier.where}); put it first, or select other layers")
        quantized |= selected


def check_recipe(recipe: Recipe, skeleton: Skeleton | None = None) -> Skeleton:
    """All checks; returns the skeleton so callers can reuse it. Each stage's check runs on the
    skeleton, then its effect on the model state; each export's format judges the state it gets."""
    check_rules(recipe)
    skeleton = skeleton or build_skeleton(recipe)
    state = ModelState.of_skeleton(skeleton.model, fuses_projections(recipe))
    for entry in recipe.stages:
        if entry.stage.check is not None and skeleton.model is not None:
            entry.stage.check(recipe, entry, skeleton.model)
        if entry.name == "export":
            check_export(entry, state)
        elif entry.stage.effect is not None and skeleton.model is not None:
            state = entry.stage.effect(entry, skeleton.model, state)
    if skeleton.model is not None:
        check_ranks(recipe, skeleton.model)
        check_dense_left(recipe, skeleton.model)
    return skeleton
