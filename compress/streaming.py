"""Streaming: stages that hold one decoder layer at a time (``streaming: true`` in the recipe).

The model is a skeleton on the meta device, built from ``config.json`` (or from the layout of the
previous stage's checkpoint); its weights stay in safetensors files. A streaming stage visits the
model unit by unit: first everything outside the decoder layers (embeddings, final norm, head),
then each decoder layer in order. A unit's tensors are read from the current ``TensorSource`` (each
file opened only while they are read), the stage works on the unit, the unit is written as one
shard of the stage's output checkpoint and goes back to the meta device. That checkpoint (native
format, with its manifest) is the next stage's source.

Peak memory is one unit in the run's dtype plus what the stage carries from layer to layer (GPTQ's
calibration activations); never the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from compress.quant import QuantLinear

from .checkpoint.tensors import TensorSource
from .errors import CheckpointError
from .layerwise import decoder_layers
from .models import DTYPES

REST = ""  # the unit of every tensor outside the decoder layers


def release(module: nn.Module) -> None:
    """Send a module's parameters and buffers back to the meta device (and drop kernel caches)."""
    for sub in module.modules():
        if isinstance(sub, QuantLinear):
            sub._layout = None
    module.to("meta")


class StreamedModel:
    """A meta skeleton plus the checkpoint its weights are read from, one unit at a time.

    ``model`` is the skeleton: stages replace its modules (a dense linear by a ``QuantLinear``) as
    they would in a loaded model; ``unit(prefix)`` fills one unit with real tensors for the duration
    of a ``with`` block. ``source`` is the checkpoint the tensors come from; the pipeline moves it to
    each streaming stage's output (``target``) once that stage is saved."""

    def __init__(self, model: nn.Module, source: TensorSource, dtype: str):
        self.model, self.source, self.dtype = model, source, DTYPES[dtype]
        self.target: Path | None = None
        self.layers = decoder_layers(model)
        self._prefixes = [prefix for prefix, _ in self.layers]
        for module in self.model.modules():  # the skeleton's dense parameters in the run's dtype
            for name, param in list(module.named_parameters(recurse=False)):
                if param.is_floating_point() and param.dtype != self.dtype:
                    setattr(module, name, nn.Parameter(torch.empty_like(param, device="meta", dtype=self.dtype),
                                                       requires_grad=param.requires_grad))

    @classmethod
    def open(cls, directory: Path, dtype: str, verify: bool = True) -> "StreamedModel":
        """The skeleton of the checkpoint in ``directory`` (dense Hugging Face, GPTQ or native; the
        manifest's sha256 checked when there is one) with ``directory`` as its source."""
        from .checkpoint.load import build_model, read_layout

        source = TensorSource(directory)
        layout = read_layout(directory, verify=verify, tensor_names=source.names())
        modules = {name: (config, shape or (source.shape(f"{name}.scales")[1], source.shape(f"{name}.g_idx")[0]))
                   for name, (config, shape) in layout.modules.items()}
        model = build_model(layout.config, modules, (layout.manifest or {}).get("layer_widths"))
        return cls(model.eval(), source, dtype)

    @property
    def units(self) -> list[str]:
        return [REST] + self._prefixes

    def unit_names(self, prefix: str) -> list[str]:
        if prefix != REST:
            return self.source.names(prefix)
        return [n for n in self.source.names() if not any(n.startswith(f"{p}.") for p in self._prefixes)]

    def inside_layers(self, name: str) -> bool:
        return any(name.startswith(f"{p}.") for p in self._prefixes)

    def _expected(self, prefix: str) -> set[str]:
        """The unit's state-dict names in the skeleton (full names)."""
        names = self.model.state_dict(keep_vars=True)
        if prefix == REST:
            return {n for n in names if not self.inside_layers(n)}
        return {n for n in names if n.startswith(f"{prefix}.")}

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        owner, _, leaf = name.rpartition(".")
        return self.model.get_submodule(owner), leaf

    def _cast(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Dense floating tensors in the run's dtype; packed buffers (and their scales) as stored."""
        module, leaf = self._owner(name)
        if not tensor.is_floating_point() or (isinstance(module, QuantLinear) and leaf != "bias"):
            return tensor
        return tensor.to(self.dtype)

    def _fill(self, prefix: str) -> nn.Module:
        from .checkpoint.load import is_tied_head

        expected = self._expected(prefix)
        tensors = self.source.read([n for n in self.unit_names(prefix) if n in expected], self._cast)
        tensors.update({n: None for n in self.unit_names(prefix) if n not in expected})  # reported below
        tied = {n for n in expected - set(tensors) if is_tied_head(n, self.model.config)}
        missing, unexpected = sorted(expected - set(tensors) - tied), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise CheckpointError(f"{self.source.directory}: {prefix or 'outside the decoder layers'}: "
                                  f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(unexpected)} "
                                  f"unexpected (e.g. {unexpected[:2]})")
        self.model.load_state_dict(tensors, strict=False, assign=True)
        if tied:
            self.model.tie_weights()
        return self.model if prefix == REST else self.model.get_submodule(prefix)

    def state_of(self, prefix: str) -> dict[str, torch.Tensor]:
        """The unit's tensors as a checkpoint stores them: full names, a tied head stored once."""
        from .checkpoint.write import model_state

        if prefix != REST:
            return {f"{prefix}.{k}": v for k, v in model_state(self.model.get_submodule(prefix)).items()}
        state, seen = {}, set()
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if not self.inside_layers(name) and id(tensor) not in seen:
                seen.add(id(tensor))
                state[name] = tensor.detach()
        return state

    def _release(self, prefix: str) -> None:
        if prefix != REST:
            release(self.model.get_submodule(prefix))
            return
        replaced: dict[int, torch.Tensor] = {}  # tied tensors stay one tensor
        for name in self._expected(REST):
            module, leaf = self._owner(name)
            if isinstance(module, QuantLinear):
                module._layout = None
            tensor = getattr(module, leaf)
            if tensor is not None and not tensor.is_meta:
                replaced.setdefault(id(tensor), meta_like(tensor))
                if isinstance(tensor, nn.Parameter):
                    setattr(module, leaf, replaced[id(tensor)])
                else:
                    module._buffers[leaf] = replaced[id(tensor)]

    @contextmanager
    def unit(self, prefix: str) -> Iterator[nn.Module]:
        """The unit filled with its tensors inside the block; back on the meta device after it."""
        try:
            yield self._fill(prefix)
        finally:
            self._release(prefix)


def meta_like(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
