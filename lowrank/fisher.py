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

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

LOGIT_SLICE_BYTES = 64 * 2**20  # fp32 logits the head's gradient holds at once (``head_gradients``)


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


@contextmanager
def output_fisher(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """{name: float64 [out_features]}: while the block runs, every backward pass through ``modules``
    adds the squares of dL/dy, y the module's output, summed over positions (and batch): the
    diagonal Fisher of the layer's outputs (BRECQ, Li et al. 2021): row weights of an output error
    in loss units. On Gemma-3-270M they rank matrices against their measured loss no better than
    the weight Fisher's row means (Spearman 0.39 against 0.40, ``benchmarks/lqlora_sensitivity.py``).
    ``layer_fisher`` with the upstream gradient of each sample's loss gives per-sample sums, as
    ``empirical_fisher`` does for weights."""
    sums = {name: torch.zeros(m.out_features, dtype=torch.float64, device=m.weight.device)
            for name, m in modules.items()}

    def forward_hook(name: str):
        def add(grad: torch.Tensor) -> None:  # returns nothing: the gradient flows on unchanged
            sums[name].add_(grad.detach().double().square().reshape(-1, grad.shape[-1]).sum(dim=0))

        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(add)
        return hook

    handles = [module.register_forward_hook(forward_hook(name)) for name, module in modules.items()]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def layer_fisher(layer: nn.Module, samples: list[tuple[tuple, dict]], upstream: list[torch.Tensor],
                 targets: dict[str, nn.Parameter]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """One decoder layer's share of ``empirical_fisher``, for a model walked layer by layer.

    ``samples``: the layer's (args, kwargs) for each sample (args[0] its input hidden states);
    ``upstream``: dL_n/d(output) of each sample, from the layer above (or the head). Each sample is
    run forward and back on its own, so the squared gradients are per-sample as in
    ``empirical_fisher``. Returns ({target name: float64 Fisher}, dL_n/d(input) per sample)."""
    parameters = list(layer.parameters())
    flags = [p.requires_grad for p in parameters]
    fisher = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in targets.items()}
    for parameter in parameters:
        parameter.requires_grad_(False)
    handles = []
    for name, parameter in targets.items():
        parameter.requires_grad_(True)
        handles.append(parameter.register_post_accumulate_grad_hook(_accumulator(fisher[name])))
    below = []
    try:
        with torch.enable_grad():
            for (args, kwargs), grad in zip(samples, upstream):
                hidden = args[0].detach().requires_grad_(True)
                out = layer(hidden, *args[1:], **kwargs)
                (out[0] if isinstance(out, tuple) else out).backward(grad)
                below.append(hidden.grad)
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in zip(parameters, flags):
            parameter.grad = None
            parameter.requires_grad_(flag)
    return fisher, below


def head_gradients(norm: nn.Module, head: nn.Module, hidden: list[torch.Tensor], samples: list[torch.Tensor],
                   slice_bytes: int = LOGIT_SLICE_BYTES) -> list[torch.Tensor]:
    """dL_n/d(final hidden states) of each sample: L_n is the next-token loss of ``samples[n]`` (1-D
    tokens) with logits ``head(norm(hidden[n]))``, as in ``empirical_fisher``. The head runs on slices
    of positions holding at most ``slice_bytes`` of fp32 logits (each position's gradient depends on
    its own logits only), so a 262 k vocabulary at 512 tokens holds 64 MiB of logits, not 0.5 GiB."""
    grads = []
    with torch.enable_grad():
        for states, tokens in zip(hidden, samples):
            grads.append(_sliced_head_gradient(norm, head, states.detach(), tokens.view(-1), slice_bytes))
    return grads


def _sliced_head_gradient(norm: nn.Module, head: nn.Module, states: torch.Tensor, tokens: torch.Tensor,
                          slice_bytes: int) -> torch.Tensor:
    """dL/d``states`` [1, s, h] of the mean next-token cross entropy, slice by slice of positions
    (the last position predicts nothing: its gradient is zero)."""
    predicted = states.shape[1] - 1
    targets = tokens[1:].to(states.device)
    width = max(1, slice_bytes // (4 * head.out_features))
    grad = torch.zeros_like(states)
    for start in range(0, predicted, width):
        end = min(start + width, predicted)
        part = states[:, start:end].requires_grad_(True)
        logits = head(norm(part))[0].float()
        loss = nn.functional.cross_entropy(logits, targets[start:end], reduction="sum") / predicted
        loss.backward(inputs=[part])
        grad[:, start:end] = part.grad
    return grad
