"""lowrank.fisher: per-sample squared gradients, accumulated without holding every gradient."""

import torch

from compress.lowrank.fisher import empirical_fisher
from conftest import micro_llama

TARGETS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def samples():
    generator = torch.Generator().manual_seed(4)
    return [torch.randint(0, 512, (12,), generator=generator) for _ in range(3)]


def test_fisher_equals_sum_of_per_sample_squared_gradients():
    model = micro_llama().double()
    fisher = empirical_fisher(model, samples(), TARGETS)
    weights = [dict(model.named_parameters())[name] for name in TARGETS]
    expected = [torch.zeros_like(w) for w in weights]
    for tokens in samples():  # independent reference: torch.autograd.grad per sample, float64
        logits = model(input_ids=tokens.view(1, -1)).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, tokens[1:])
        for total, grad in zip(expected, torch.autograd.grad(loss, weights)):
            total += grad.square()
    for name, reference in zip(TARGETS, expected):
        assert fisher[name].dtype == torch.float64  # the squared fp32 gradients summed in float64
        torch.testing.assert_close(fisher[name], reference, rtol=1e-5, atol=1e-12)
    assert all(float(f.abs().sum()) > 0 for f in fisher.values())


def test_at_most_one_target_gradient_alive_and_flags_restored():
    model = micro_llama()
    targets = [name for name, _ in model.named_parameters() if name.endswith("proj.weight")]
    parameters = dict(model.named_parameters())
    alive = []
    for name in targets:  # observe (registered before the accumulators: runs first)
        parameters[name].register_post_accumulate_grad_hook(
            lambda p: alive.append(sum(parameters[n].grad is not None for n in targets)))
    before = {name: p.requires_grad for name, p in parameters.items()}
    empirical_fisher(model, samples()[:1], targets)
    assert alive and max(alive) == 1
    assert {name: p.requires_grad for name, p in parameters.items()} == before
    assert all(p.grad is None for p in parameters.values())


def test_head_gradients_by_slices_of_positions_equal_the_whole_logits_gradient():
    """The head's per-sample gradients computed a few positions at a time (a 3-position budget here)
    against autograd over the whole logits (fp32 logits, as both compute them; float64 elsewhere)."""
    from compress.lowrank.fisher import head_gradients

    model = micro_llama().double()
    norm, head = model.model.norm, model.lm_head
    tokens = samples()
    hidden = [torch.randn(1, t.numel(), model.config.hidden_size, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(n)) for n, t in enumerate(tokens)]
    width = 3 * 4 * model.config.vocab_size  # bytes of 3 positions' fp32 logits: 11 positions -> 4 slices
    sliced = head_gradients(norm, head, hidden, tokens, slice_bytes=width)
    for states, t, got in zip(hidden, tokens, sliced):
        states = states.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(head(norm(states))[0, :-1].float(), t[1:])
        expected, = torch.autograd.grad(loss, states)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
        assert float(got[0, -1].abs().sum()) == 0 and float(got.abs().sum()) > 0
