"""Streaming: a source of units (``compress.execution.walker``) whose weights stay in safetensors files.

The model is a skeleton on the meta device, built from ``config.json`` (or from the layout of the
previous stage's checkpoint); its weights stay in safetensors files (``streaming: true`` in the
recipe). A unit's tensors are read from the current ``TensorSource`` (each file opened only while
they are read) onto the compute device, the stage works on the unit, the unit is written as one
shard of the stage's output checkpoint and goes back to the meta device. That checkpoint (native
format, with its manifest) is the next stage's source.

Peak memory is the largest unit in the run's dtype plus what the stage carries from layer to layer
(GPTQ's calibration activations); never the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from compress.lowrank import LoRALinear
from compress.quant import QuantLinear

from ..checkpoint.formats import FORMATS
from ..checkpoint.load import build_model, read_layout, wrap_adapters
from ..checkpoint.store import save_model
from ..checkpoint.tensors import TensorSource
from ..dtypes import DTYPES
from ..errors import CheckpointError, StageError
from ..targets import stored_name
from .memory import release_freed_memory
from .walker import HOST, UnitMap, decoder_layers, drop_kernel_caches, placed


def release(module: nn.Module) -> None:
    """Send a module's parameters and buffers back to the meta device (and drop kernel caches)."""
    drop_kernel_caches(module)
    module.to("meta")


def meta_like(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta


class StreamedModel(UnitMap):
    """A meta skeleton plus the checkpoint its weights are read from, one unit at a time.

    ``model`` is the skeleton: stages replace its modules (a dense linear by a ``QuantLinear``) as
    they would in a loaded model; ``unit(prefix)`` fills one unit with real tensors on ``device``
    for the duration of a ``with`` block. ``source`` is the checkpoint the tensors come from; it
    moves to each stage's output (``target``) once that stage is done (``end_stage``)."""

    holds_model = False  # only one unit is ever real

    def __init__(self, model: nn.Module, source: TensorSource, dtype: str, device: torch.device = HOST):
        self.model, self.source, self.dtype, self.device = model, source, DTYPES[dtype], torch.device(device)
        self.target: Path | None = None
        self.layers = decoder_layers(model)
        self.layer_prefixes = [prefix for prefix, _ in self.layers]
        self._retie()
        cast: dict[int, nn.Parameter] = {}  # the skeleton's dense parameters in the run's dtype (ties kept)
        for module in self.model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param.is_floating_point() and param.dtype != self.dtype:
                    cast.setdefault(id(param), nn.Parameter(torch.empty_like(param, device="meta", dtype=self.dtype),
                                                            requires_grad=param.requires_grad))
                    setattr(module, name, cast[id(param)])
        self.units = self._outer_units() + self.layer_prefixes

    @classmethod
    def open(cls, directory: Path, dtype: str, verify: bool = True, device: torch.device = HOST) -> "StreamedModel":
        """The skeleton of the checkpoint in ``directory`` (dense Hugging Face, GPTQ or native; the
        manifest's sha256 checked when there is one) with ``directory`` as its source."""
        source = TensorSource(directory)
        layout = read_layout(directory, verify=verify, tensor_names=source.names())
        fmt = FORMATS[layout.format]
        if fmt.stream_source_refusal:
            raise CheckpointError(f"{directory}: streaming reads dense, GPTQ and native checkpoints; "
                                  f"{fmt.stream_source_refusal}")
        modules = {name: (config, shape or fmt.stored_shape(name, _leaves(source, name), source))
                   for name, (config, shape) in layout.modules.items()}
        model = build_model(layout.config, modules, (layout.manifest or {}).get("layer_widths"))
        adapters = (layout.manifest or {}).get("adapters") or {}
        if adapters:
            with torch.device("meta"):
                wrap_adapters(model, adapters, {}, directory)
        return cls(model.eval(), source, dtype, device)

    def _state(self) -> dict[str, torch.Tensor]:
        """The skeleton's state, a tensor shared by two names (a tied head) under its first name."""
        state, seen = {}, set()
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                state[name] = tensor
        return state

    def _outer_units(self) -> list[str]:
        units: list[str] = []
        for name in self._state():
            unit = self.unit_of(name)
            if unit not in self.layer_prefixes and unit not in units:
                units.append(unit)
        return units

    def unit_names(self, prefix: str) -> list[str]:
        """The source's tensor names in unit ``prefix``."""
        return [n for n in self.source.names() if self.unit_of(n) == prefix]

    def _expected(self, prefix: str) -> dict[str, torch.Tensor]:
        """The unit's tensors by their names in a checkpoint (an adapter's base under the layer's)."""
        return {stored_name(n): t for n, t in self._state().items() if self.unit_of(n) == prefix}

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        """(module, attribute) holding a tensor named as in a checkpoint."""
        owner, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(owner)
        return (module.base_layer, leaf) if isinstance(module, LoRALinear) else (module, leaf)

    def _dtype_for(self, name: str, stored: torch.dtype) -> torch.dtype:
        """Dense floating tensors in the run's dtype; packed buffers (and their scales) as stored."""
        module, leaf = self._owner(name)
        if not stored.is_floating_point or (isinstance(module, QuantLinear) and leaf != "bias"):
            return stored
        return self.dtype

    def _fill(self, prefix: str) -> nn.Module:
        expected, present = self._expected(prefix), self.unit_names(prefix)
        missing, unexpected = sorted(set(expected) - set(present)), sorted(set(present) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{self.source.directory}: {prefix}: {len(missing)} tensors missing (e.g. "
                                  f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        tensors = {n: t.to(self.device) for n, t in self.source.read(present, self._dtype_for).items()}
        skeleton_names = {stored_name(n): n for n in self._state()}
        self.model.load_state_dict({skeleton_names[n]: t for n, t in tensors.items()}, strict=False, assign=True)
        self._retie()
        release_freed_memory()  # the read's buffers
        return self.model.get_submodule(prefix)

    def _retie(self) -> None:
        """A tied dense head follows the embeddings (real while they are in memory, meta after)."""
        head = self.model.get_output_embeddings()
        if getattr(self.model.config, "tie_word_embeddings", False) and type(head) is nn.Linear:
            head.weight = self.model.get_input_embeddings().weight

    def state_of(self, prefix: str) -> dict[str, torch.Tensor]:
        """The unit's tensors as a checkpoint stores them (full names, a tied head stored once)."""
        return {n: t.detach() for n, t in self._expected(prefix).items()}

    def _release(self, prefix: str) -> None:
        if prefix in self.layer_prefixes:
            release(self.model.get_submodule(prefix))
            return
        for name, tensor in self._expected(prefix).items():
            module, leaf = self._owner(name)
            drop_kernel_caches(module)
            if tensor is not None and not tensor.is_meta:
                if isinstance(tensor, nn.Parameter):
                    setattr(module, leaf, meta_like(tensor))
                else:
                    module._buffers[leaf] = meta_like(tensor)
        self._retie()

    @contextmanager
    def unit(self, prefix: str) -> Iterator[nn.Module]:
        """The unit filled with its tensors inside the block; back on the meta device after it, and
        its memory given back to the system (see ``release_freed_memory``)."""
        try:
            yield self._fill(prefix)
        finally:
            self._release(prefix)
            release_freed_memory()

    @contextmanager
    def walk(self) -> Iterator[None]:
        """The skeleton's real tensors outside every unit (rotary tables) on the device for the walk."""
        extras = [m for m in self.outer_modules()
                  if not any(t.is_meta for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])]
        with placed(extras, self.device):
            yield

    def drop(self, module: nn.Module) -> None:
        """A module just replaced in the skeleton: its tensors go now, not with its unit."""
        release(module)

    def kept(self, prefix: str) -> dict[str, torch.Tensor]:
        """What leaves with a unit: its tensors, one shard of the stage's checkpoint."""
        return self.state_of(prefix)

    def keep(self, ctx, kept: Iterable[dict], count: int) -> None:
        """Write each unit's tensors as they come as one shard of ``target`` (rank 0; the other
        ranks make the same walk)."""
        if ctx.ranks.main:
            save_model(ctx.model, self.target, shards=(count, kept))
        else:
            for _ in kept:
                pass

    def begin_stage(self, target: Path) -> None:
        """A stage that changes the model writes it to ``target`` unit by unit."""
        self.target = target

    def save(self, path: Path) -> None:
        """The stage has written its checkpoint at ``path`` as it walked."""
        if self.target != path or not path.is_dir():
            raise StageError(f"{path}: a streaming stage that changes the model writes it unit by unit; nothing "
                             "was written here (a stage that does not walk the units cannot stream)")

    def end_stage(self) -> None:
        """The next stage reads what this one wrote."""
        self.source = TensorSource(self.target)

    def export_shards(self, ctx, description: str, split_adapters: bool):
        """((count, iterator of each unit's tensors read from the source), adapter tensors): the
        adapters (``.lora_`` tensors) are set aside as their units pass when ``split_adapters``."""
        adapters: dict[str, torch.Tensor] = {}

        def shards():
            for prefix in ctx.track(self.units, description):
                tensors = self.source.read(self.unit_names(prefix))
                if split_adapters:
                    adapters.update({n: t for n, t in tensors.items() if ".lora_" in n})
                    tensors = {n: t for n, t in tensors.items() if ".lora_" not in n}
                yield tensors

        return (len(self.units), shards()), adapters


def open_source(recipe, source, model_dir: Path | None, device: torch.device):
    """(model, tokenizer, stream) of the model in ``model_dir`` (a saved stage's checkpoint) or
    else the recipe's model ``source``: with ``streaming: true`` a skeleton and its ``StreamedModel``
    (nothing but the config is loaded), otherwise the loaded model and no stream."""
    from ..checkpoint.load import load_checkpoint
    from ..models.sources import load_model, load_tokenizer

    if recipe.spec.streaming:
        stream = StreamedModel.open(model_dir or source.path, recipe.spec.dtype, device=device)
        return stream.model, load_tokenizer(source), stream
    if model_dir is not None:
        return load_checkpoint(model_dir, dtype=recipe.spec.dtype), load_tokenizer(source), None
    model, tokenizer = load_model(source, recipe.spec.dtype)
    return model, tokenizer, None


def _leaves(source: TensorSource, module: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """leaf -> (safetensors code, shape) of one module's stored tensors, from the headers."""
    return {name.removeprefix(f"{module}."): (source.dtype_code(name), source.shape(name))
            for name in source.names(module)}
