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
