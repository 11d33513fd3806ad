"""Perplexity of a causal LM over fixed token windows (each window scored on its own): through the
whole model at once, or unit by unit (``perplexity_by_units``: one decoder layer on the device at a
time, for a model that does not fit it or a streamed one; the same operations in the same order)."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ..errors import ModelError
from ..models.chunked_loss import head_logits, nll_sum, window_nll

MAX_EXP_ARGUMENT = math.log(sys.float_info.max)
__all__ = ["exp_or_inf", "hidden_by_units", "perplexity", "perplexity_by_units", "window_nll"]


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, track=None) -> float:
    """exp(mean NLL per predicted token) over all windows, in batches of ``batch_size`` (``inf`` when
    it overflows a float)."""
    check_token_ids(model, windows)
    batches = list(torch.split(windows, batch_size))
    iterator = track(batches, "perplexity") if track else batches
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in iterator:
        nll, tokens = window_nll(model, batch.to(device))
        total += nll
        count += tokens
    return exp_or_inf(total / count)


@torch.no_grad()
def perplexity_by_units(units, windows: torch.Tensor, batch_size: int = 4, track=None) -> float:
    """``perplexity`` through a source of units (``compress.execution.walker``): the batches' hidden states go
    through the decoder one layer at a time, then the final norm and the head score them."""
    check_token_ids(units.model, windows)
    batches = [batch.to(units.device) for batch in torch.split(windows, batch_size)]
    return exp_or_inf(_by_units(units, batches, track, lambda hidden: _head_nll(units.model, hidden, batches)))


@torch.no_grad()
def hidden_by_units(units, tokens: torch.Tensor, finish=None):
    """``finish(model, last hidden states after the final norm)`` for ``tokens`` (one batch) through a
    source of units, with the head placed where the states are (default: the states, on the host)."""
    batch = [tokens.to(units.device)]
    finish = finish or (lambda model, states: states.cpu())
    return _by_units(units, batch, None, lambda hidden: finish(units.model, _normed(units.model, hidden[0])))


def _normed(model: nn.Module, states: torch.Tensor) -> torch.Tensor:
    return model.get_decoder().norm(states)


def _by_units(units, batches: list[torch.Tensor], track, finish):
    """``finish(last hidden states of each batch)``, the hidden states made one decoder layer at a
    time, the final norm and head placed for ``finish``."""
    from .layerwise import call_layer, first_layer_inputs
    from .walker import outer_units

    with units.walk():
        with units.unit(units.embeddings):
            inputs = first_layer_inputs(units.model, torch.cat(batches), batches[0].shape[0])
        for prefix in track(units.layer_prefixes, "perplexity layers") if track else units.layer_prefixes:
            with units.unit(prefix) as layer:
                inputs = [((call_layer(layer, args, kwargs),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
        with outer_units(units):
            return finish([args[0] for args, _ in inputs])


def _head_nll(model: nn.Module, hidden: list[torch.Tensor], batches: list[torch.Tensor]) -> float:
    """Mean next-token NLL of the last decoder layer's outputs through the final norm and the head."""
    total, count = 0.0, 0
    for states, batch in zip(hidden, batches):
        total += float(nll_sum(model, _normed(model, states), batch))
        count += batch[:, 1:].numel()
    return total / count


def check_token_ids(model: nn.Module, windows: torch.Tensor) -> None:
    """Every token id has an embedding (a tokenizer from another model gives ids past the end)."""
    size = model.get_input_embeddings().num_embeddings
    top = int(windows.max()) if windows.numel() else 0
    if top >= size:
        raise ModelError(f"the text's token ids reach {top}, but the model embeds only {size} (the tokenizer does "
                         "not belong to this model)")


def exp_or_inf(mean_nll: float) -> float:
    """exp of a mean loss; a model so wrong that it overflows a float reports ``inf``, not a crash
    (a nan loss stays nan)."""
    if math.isnan(mean_nll):
        return math.nan
    return math.exp(mean_nll) if mean_nll < MAX_EXP_ARGUMENT else math.inf


def kernels_used(model, device: torch.device | None = None) -> dict:
    """The dequant-matmul backend(s) the quantized layers ran in the last forward (on ``device``,
    default: where the model is now), and why."""
    from compress.kernels import select_backend
    from compress.quant import QuantLinear

    ran = sorted({m.backend for m in model.modules() if isinstance(m, QuantLinear) and m.backend})
    if not ran:
        return {}
    first = next(model.parameters())
    device = device if device is not None else first.device
    return {"kernel": ", ".join(ran), "kernel_reason": select_backend(device, first.dtype)[1]}
