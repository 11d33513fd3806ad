"""The losses over slices of positions (compress.models.chunked_loss) against transformers' whole-logit losses
computed in float64, with budgets small enough that every batch is cut into many slices."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from compress.models.chunked_loss import causal_lm_loss, position_slices, window_nll
from compress.training.distill import chunked_distill_loss, distill_loss, log_tail_mass, top_log_probs, top_logits

TINY_BUDGET = 3 * 1000 * 4 * 2  # fp32 logits of 3 positions x batch 2 x vocab 1000: slices of 3 positions


def _model(kind: str):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=1000)
    config = (Gemma3TextConfig(**common, final_logit_softcapping=5.0, sliding_window=16) if kind == "gemma3-softcap"
              else LlamaConfig(**common, tie_word_embeddings=False))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double()


@pytest.fixture
def windows():
    return torch.randint(0, 1000, (2, 23), generator=torch.Generator().manual_seed(3))


def test_slices_cover_every_position_once():
    parts = position_slices(23, 2, 1000, TINY_BUDGET)
    assert [p.start for p in parts] == list(range(0, 23, 3)) and parts[-1].stop == 23


@pytest.mark.parametrize("kind", ["llama", "gemma3-softcap"])
def test_causal_lm_loss_and_gradients_equal_the_whole_logit_loss(kind, windows):
    model = _model(kind)
    reference = model(input_ids=windows, labels=windows, use_cache=False).loss  # float64, soft-capped logits
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours = causal_lm_loss(model, windows, budget=TINY_BUDGET)
    ours.backward()
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-5, atol=1e-9, msg=name)


def test_window_nll_sums_the_next_token_losses(windows):
    model = _model("llama")
    logits = model(input_ids=windows).logits
    with torch.no_grad():
        reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
    total, count = window_nll(model, windows, budget=TINY_BUDGET)
    assert count == 2 * 22 and total == pytest.approx(float(reference), rel=1e-6)  # fp32 logits per slice


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_chunked_distill_loss_equals_the_whole_logit_one(weight, windows):
    model, teacher = _model("llama"), _model("gemma3-softcap")
    with torch.no_grad():
        teacher_logits = teacher(input_ids=windows).logits
    values, indices = top_logits(teacher_logits, 8)
    tail = log_tail_mass(top_log_probs(teacher_logits, indices, 2.0)).float()
    reference = distill_loss(model(input_ids=windows).logits, windows, values, indices, tail, weight, 2.0)
    reference.backward()
    expected = model.lm_head.weight.grad.clone()
    model.zero_grad()
    import compress.models.chunked_loss as chunked

    budget, chunked.LOGIT_CHUNK_BYTES = chunked.LOGIT_CHUNK_BYTES, TINY_BUDGET
    try:
        ours = chunked_distill_loss(model, windows, values, indices, tail, weight, 2.0)
    finally:
        chunked.LOGIT_CHUNK_BYTES = budget
    ours.backward()
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    torch.testing.assert_close(model.lm_head.weight.grad, expected, rtol=1e-4, atol=1e-7)


def test_autograd_keeps_no_vocabulary_wide_tensor(windows):
    """What the backward pass holds: hidden states, never [batch, positions, vocab] logits."""
    model = _model("llama").float()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        causal_lm_loss(model, windows, budget=TINY_BUDGET)
    assert saved and not [shape for shape in saved if shape and shape[-1] == 1000 and len(shape) == 3], saved
