"""The diagonal empirical Fisher, one decoder layer at a time on the compute device (``compress.execution.walker``).

``lowrank.fisher.empirical_fisher`` needs the whole model for each sample's backward pass. Here the
same per-sample gradients (the same operations in the same order: the same bits) are computed in
two walks over the decoder layers of either source, resident or streamed:

1. forward, layer by layer: each layer's input hidden states (every sample) are saved to disk
   under ``directory/activations-rank<r>`` and the layer's outputs become the next layer's inputs;
2. the head (final norm and output matrix, with the modules outside the layers in memory) gives
   dL_n/d(last hidden states) per sample; then backward, from the last layer to the first: each
   layer is run again on its saved inputs and back-propagated with the gradient from above
   (``lowrank.fisher.layer_fisher``); its targets' squared gradients (``of="outputs"``: the squared
   gradients of their outputs, summed over positions) are written as one file per layer,
   ``directory/<layer>.safetensors`` (float32), and dL_n/d(inputs) go one layer down.

Disk holds one boundary's activations per layer (samples x seq_len x hidden in the run's dtype);
the device holds one layer, one boundary's activations and one boundary's gradients. With ``torchrun``
each rank takes its share of the samples and the float64 sums are added in rank order, as in the
in-memory path, so the files are the same bytes on every rank and for any number of ranks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from compress.lowrank.fisher import head_gradients, layer_fisher, output_fisher

from ..checkpoint.tensors import read_safetensors, write_safetensors
from ..errors import StageError
from ..execution.layerwise import call_layer, first_layer_inputs
from ..execution.walker import outer_units

ACTIVATIONS = "activations"


def fisher_file(directory: Path, layer: str) -> Path:
    return directory / f"{layer}.safetensors"


def load_layer_fisher(directory: Path | None, layer: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """{module name: Fisher of its weight, or of its outputs} for one layer, on ``device`` (the unit's: the Fisher meets
    its weight and Hessian there), {} without a Fisher or targets there."""
    if directory is None or not fisher_file(directory, layer).is_file():
        return {}
    return {name: tensor.to(device) for name, tensor in read_safetensors(fisher_file(directory, layer)).items()}


def fisher_by_layer(ctx, names: list[str], directory: Path, of: str = "weights") -> Path:
    """Write the Fisher of every module in ``names`` (linears inside the decoder layers, by full
    name) to ``directory``, one file per layer; returns ``directory``. ``of``: ``weights`` (the
    weight's diagonal Fisher, [out, in]) or ``outputs`` (the diagonal Fisher of the module's outputs,
    [out]: ``lowrank.fisher.output_fisher``, from the same per-sample backward passes)."""
    units = ctx.units
    outside = [n for n in names if not any(units.owns(p, n) for p in units.layer_prefixes)]
    if outside:
        raise StageError(f"{ctx.entry.where}: fisher: true covers linears inside the decoder layers only; add "
                         f"{outside[0]!r} to ignore")
    if ctx.ranks.main:
        shutil.rmtree(directory, ignore_errors=True)
    ctx.ranks.barrier()
    activations = directory / f"{ACTIVATIONS}-rank{ctx.ranks.rank}"  # each rank's own samples
    activations.mkdir(parents=True)
    windows = ctx.windows("calibration").to(ctx.device)
    samples = [windows[i] for i in ctx.ranks.share(range(windows.shape[0]))]
    norm = getattr(ctx.model.get_decoder(), "norm", None)
    if norm is None or windows.shape[0] < ctx.ranks.world:  # the same answer on every rank
        raise StageError(f"{ctx.entry.where}: fisher: true needs a decoder whose final norm is its `norm` (Llama "
                         f"family) and at least one calibration sample per rank ({windows.shape[0]} samples, "
                         f"{ctx.ranks.world} ranks)")
    with units.walk():
        _backward(ctx, names, directory, activations, samples, norm, of)
    activations.rmdir()
    ctx.ranks.barrier()
    return directory


def _backward(ctx, names: list[str], directory: Path, activations: Path, samples: list, norm, of: str) -> None:
    """The forward walk, the head's gradients, then the backward walk writing one file per layer."""
    units = ctx.units
    kwargs, hidden = _forward(ctx, samples, activations)
    with outer_units(units):
        upstream = head_gradients(norm, ctx.model.get_output_embeddings(), hidden, [s.view(1, -1) for s in samples])
    del hidden
    for index, prefix in ctx.track(list(enumerate(units.layer_prefixes))[::-1], "fisher backward"):
        saved = torch.load(activations / f"{index}.pt")
        with units.unit(prefix) as layer:
            modules = {n: ctx.model.get_submodule(n) for n in names if units.owns(prefix, n)}
            inputs = [((states,) + args, kw) for states, (args, kw) in zip(saved, kwargs)]
            if of == "outputs":
                with output_fisher(modules) as fisher:
                    upstream = layer_fisher(layer, inputs, upstream, {})[1]
            else:
                fisher, upstream = layer_fisher(layer, inputs, upstream, {n: m.weight for n, m in modules.items()})
        total = {n: ctx.ranks.sum_in_rank_order(f).float().contiguous() for n, f in fisher.items()}
        if total and ctx.ranks.main:
            partial = fisher_file(directory, prefix).with_suffix(".part")
            write_safetensors(partial, total, metadata={})  # no metadata: the bytes save_file wrote before
            partial.replace(fisher_file(directory, prefix))
        (activations / f"{index}.pt").unlink()


def _forward(ctx, samples: list[torch.Tensor], activations: Path):
    """Walk the layers forward, saving each layer's input hidden states (one tensor per sample) as
    ``activations/<index>.pt``. Returns (each sample's other layer arguments, the last layer's
    outputs)."""
    units = ctx.units
    with units.unit(units.embeddings):
        captured = first_layer_inputs(ctx.model, torch.stack(samples), batch=1)
    rest = [(tuple(args[1:]), kwargs) for args, kwargs in captured]
    hidden = [args[0] for args, _ in captured]
    for index, prefix in ctx.track(list(enumerate(units.layer_prefixes)), "fisher forward"):
        torch.save(hidden, activations / f"{index}.pt")
        with units.unit(prefix) as layer, torch.no_grad():
            hidden = [call_layer(layer, (states,) + args, kwargs) for states, (args, kwargs) in zip(hidden, rest)]
    return rest, hidden
