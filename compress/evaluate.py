"""Perplexity of a causal LM over fixed token windows (each window scored on its own)."""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError

MAX_EXP_ARGUMENT = math.log(sys.float_info.max)


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """(summed next-token negative log-likelihood, tokens scored) for a batch of windows."""
    logits = model(input_ids=windows, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="sum")
    return float(nll), windows[:, 1:].numel()


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


def kernels_used(model) -> dict:
    """The dequant-matmul backend(s) the quantized layers ran in the last forward, and why."""
    from compress.kernels import select_backend
    from compress.quant import QuantLinear

    ran = sorted({m.backend for m in model.modules() if isinstance(m, QuantLinear) and m.backend})
    if not ran:
        return {}
    device = next(model.parameters()).device
    return {"kernel": ", ".join(ran), "kernel_reason": select_backend(device)[1]}
