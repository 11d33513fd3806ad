"""Next-token losses over large vocabularies without [batch, positions, vocab] logits in memory.

The decoder runs once; the head (``lm_head`` plus the final logit soft-capping of the models that
have it, as transformers' ``*ForCausalLM.forward`` applies them) then scores a slice of positions at
a time, so logits of at most ``LOGIT_CHUNK_BYTES`` exist at once (Gemma-3's 262,144-token vocabulary
at 4 x 512 tokens would otherwise be 2 GiB per fp32 copy; Llama-3's 128 k at 2048 tokens the same).
With gradients each slice is checkpointed: its logits are recomputed in the backward pass, so autograd
keeps the decoder's last hidden states, not V-wide tensors (the chunked loss of Liger / Unsloth).
Sums are accumulated in fp32 per slice and in float64 across slices; each slice's cross entropy is
the same ``F.cross_entropy`` on the same fp32 logits, so results equal the whole-batch loss to
summation order (tests/test_chunked_loss.py: 1e-6 relative against float64).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LOGIT_CHUNK_BYTES = 64 * 2**20  # fp32 logits alive at once (one slice, plus its softmax in the backward)


def positions_per_chunk(rows: int, vocab: int, budget: int | None = None) -> int:
    """How many positions of ``rows`` windows fit ``budget`` bytes of fp32 logits (at least one;
    default ``LOGIT_CHUNK_BYTES``)."""
    budget = LOGIT_CHUNK_BYTES if budget is None else budget
    return max(1, budget // max(1, rows * vocab * 4))


def loss_slice_bytes(arch, batch: int, seq: int, compute_bytes: float) -> float:
    """Peak bytes of the no-grad loss over ``batch`` windows of ``seq`` tokens (``compress plan``):
    one slice's logits in the compute dtype, their fp32 copy and the fp32 log-softmax."""
    tokens = batch * min(seq, positions_per_chunk(batch, arch.vocab))
    return tokens * arch.vocab * (compute_bytes + 8)


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for last hidden states (after the final norm): head, then soft-capping."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def last_hidden(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """The decoder's output for ``windows`` (final norm applied), no head."""
    return model.get_decoder()(input_ids=windows, use_cache=False).last_hidden_state


def position_slices(length: int, rows: int, vocab: int, budget: int | None = None) -> list[slice]:
    step = positions_per_chunk(rows, vocab, budget)
    return [slice(start, min(start + step, length)) for start in range(0, length, step)]


def sum_over_slices(model: nn.Module, hidden: torch.Tensor, loss: Callable, *aligned: torch.Tensor,
                    budget: int | None = None) -> torch.Tensor:
    """Sum (float64 scalar) of ``loss(logits, *aligned)`` over slices of positions: ``hidden`` [b, s, h]
    and every ``aligned`` tensor [b, s, ...] cut at the same positions, the logits of one slice made at
    a time; differentiable (each slice checkpointed) when autograd records through ``hidden``."""
    vocab = model.get_output_embeddings().weight.shape[0]

    def one(states: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
        return loss(head_logits(model, states).float(), *parts)

    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for part in position_slices(hidden.shape[1], hidden.shape[0], vocab, budget):
        args = (hidden[:, part], *(t[:, part] for t in aligned))
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(one, *args, use_reentrant=False).double()
        else:
            total = total + one(*args).double()
    return total


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def nll_sum(model: nn.Module, hidden: torch.Tensor, windows: torch.Tensor,
            budget: int | None = None) -> torch.Tensor:
    """Summed next-token NLL (float64 scalar) of ``windows`` [b, s] from their last hidden states."""
    return sum_over_slices(model, hidden[:, :-1], _nll, windows[:, 1:], budget=budget)


def causal_lm_loss(model: nn.Module, windows: torch.Tensor, budget: int | None = None) -> torch.Tensor:
    """Mean next-token cross entropy of ``windows`` (fp32 scalar), as ``model(labels=...).loss``."""
    total = nll_sum(model, last_hidden(model, windows), windows, budget)
    return (total / windows[:, 1:].numel()).float()


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, budget: int | None = None) -> tuple[float, int]:
    """(summed next-token NLL, tokens scored) for a batch of windows."""
    return float(nll_sum(model, last_hidden(model, windows), windows, budget)), windows[:, 1:].numel()


def _kl(logits: torch.Tensor, reference_hidden: torch.Tensor, model: nn.Module) -> torch.Tensor:
    reference = F.log_softmax(head_logits(model, reference_hidden).float(), dim=-1)
    return (reference.exp() * (reference - F.log_softmax(logits, dim=-1))).sum()


@torch.no_grad()
def kl_sum(model: nn.Module, hidden: torch.Tensor, reference_hidden: torch.Tensor,
           budget: int | None = None) -> float:
    """Summed KL(p_reference || p) over every position of ``hidden`` [b, s, h], both distributions
    from the model's head (the reference's logits of a slice are made beside the model's own, so
    each slice is half as long as the budget alone allows)."""
    loss = lambda logits, reference: _kl(logits, reference, model)  # noqa: E731
    return float(sum_over_slices(model, hidden, loss, reference_hidden, budget=(budget or LOGIT_CHUNK_BYTES) // 2))


@torch.no_grad()
def reduce_by_slices(model: nn.Module, hidden: torch.Tensor, reduce: Callable,
                    budget: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """``reduce(logits of a slice of positions)`` for every slice of ``hidden`` [b, s, h]: the
    caller turns each V-wide slice into a few numbers per position (top-k, tail mass) at once."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return [reduce(head_logits(model, hidden[:, part]).float())
            for part in position_slices(hidden.shape[1], hidden.shape[0], vocab, budget)]


@torch.no_grad()
def max_abs_logit_diff(model: nn.Module, hidden: torch.Tensor, other: nn.Module, other_hidden: torch.Tensor,
                       budget: int | None = None) -> tuple[float, bool]:
    """(max |logits - other's logits|, whether they are bitwise equal) slice by slice."""
    vocab = model.get_output_embeddings().weight.shape[0]
    worst, equal = 0.0, True
    for part in position_slices(hidden.shape[1], hidden.shape[0], vocab, budget):
        mine, theirs = head_logits(model, hidden[:, part]), head_logits(other, other_hidden[:, part])
        worst = max(worst, float((mine.float() - theirs.float()).abs().max()))
        equal = equal and torch.equal(mine, theirs)
    return worst, equal
