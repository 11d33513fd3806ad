"""Diagonal empirical Fisher of chosen weights: F = sum over samples of (dL_n / dW)^2, in fp32.

Each sample (one token sequence, its own next-token loss) gets its own backward pass, because the
empirical Fisher squares *per-sample* gradients (the square of a batch gradient is a different
quantity). Gradients are folded into the accumulators by post-accumulate hooks and freed at once,
so at most one target gradient exists at any moment: the model's gradients are never all held.
Only the target weights require gradients during the passes; every ``requires_grad`` flag is
restored afterwards. LQ-LoRA uses F to weight its low-rank step, its error and the ILP costs
(``lowrank.decompose``); a global rescaling of F changes none of them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def _causal_lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens.view(1, -1)).logits[0, :-1].float()
    return nn.functional.cross_entropy(logits, tokens.view(-1)[1:].to(logits.device))


def empirical_fisher(model: nn.Module, samples: Iterable[torch.Tensor], targets: list[str],
                     progress=None) -> dict[str, torch.Tensor]:
    """{weight name: float64 diagonal Fisher (sums of squared gradients)}, for the parameters named in
    ``targets``. Float64 keeps the sum (nearly) independent of the order of the samples, so sums over
    disjoint parts of them (one per rank) add up to the same float32 values.

    ``samples`` yields 1-D token tensors; ``progress`` (optional) is called once per sample."""
    parameters = dict(model.named_parameters())
    missing = [name for name in targets if name not in parameters]
    if missing:
        raise KeyError(f"no parameter named {missing[0]!r}")
    flags = {name: p.requires_grad for name, p in parameters.items()}
    fisher = {name: torch.zeros_like(parameters[name], dtype=torch.float64) for name in targets}
    handles = []
    for name, parameter in parameters.items():
        parameter.requires_grad_(name in fisher)
    for name in targets:
        handles.append(parameters[name].register_post_accumulate_grad_hook(_accumulator(fisher[name])))
    try:
        for tokens in samples:
            _causal_lm_loss(model, tokens).backward()
            if progress is not None:
                progress()
    finally:
        for handle in handles:
            handle.remove()
        for name, parameter in parameters.items():
            parameter.grad = None
            parameter.requires_grad_(flags[name])
    return fisher


def _accumulator(total: torch.Tensor):
    def hook(parameter: torch.Tensor) -> None:
        total.add_(parameter.grad.double().square())
        parameter.grad = None  # freed before the next weight's gradient is computed
    return hook
