"""L4Q's custom autograd Function against plain autograd through a straight-through estimator, in
float64, batch > 1, with clipped entries present, and with LSQ's gradient scale."""

import pytest
import torch

from compress.lowrank.l4q import L4QMatmul


def ste_reference(x, w0, a, b, step, offset, scaling, group_size, levels, grad_scale):
    """Plain autograd: round() with a straight-through estimator, grad_scale by LSQ's detach trick."""
    step = step * grad_scale + (step - step * grad_scale).detach()
    offset = offset * grad_scale + (offset - offset * grad_scale).detach()
    merged = w0 + scaling * (b @ a)
    step_full, offset_full = expand(step, group_size, w0.shape[1]), expand(offset, group_size, w0.shape[1])
    v = (merged - offset_full) / step_full
    clamped = torch.clamp(v, 0, levels - 1)  # clamp, then round with a straight-through estimator
    quantized = step_full * (clamped + (torch.round(clamped) - clamped).detach()) + offset_full
    return x @ quantized.t()


def expand(values, group, width):
    """Per-group values to one per weight, written independently of the code under test."""
    return torch.stack([values[:, k // group] for k in range(width)], dim=1)


@pytest.mark.parametrize("grad_scale, in_features", [(1.0, 32), (0.125, 32), (1.0, 30)],
                         ids=["whole-groups", "lsq-scale", "partial-last-group"])
def test_custom_backward_equals_straight_through_autograd(grad_scale, in_features):
    generator = torch.Generator().manual_seed(0)
    out_features, rank, group, levels = 12, 4, 8, 8

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).requires_grad_()

    x = rand(3, 5, in_features)  # batch 3 x 5 tokens: every token must count
    w0 = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    a, b = rand(rank, in_features, scale=0.3), rand(out_features, rank, scale=0.3)
    starts = range(0, in_features, group)
    low = torch.stack([w0[:, k:k + group].amin(1) for k in starts], dim=1)
    high = torch.stack([w0[:, k:k + group].amax(1) for k in starts], dim=1)
    # a step a little too small for the range, so some entries clip at both ends
    step = (0.8 * (high - low) / (levels - 1)).requires_grad_()
    offset = low.clone().requires_grad_()
    args = (x, w0, a, b, step, offset, 0.5, group, levels, grad_scale)
    grad_y = torch.randn(3, 5, out_features, generator=generator, dtype=torch.float64)

    ours = torch.autograd.grad(L4QMatmul.apply(*args), (x, a, b, step, offset), grad_y)
    theirs = torch.autograd.grad(ste_reference(*args), (x, a, b, step, offset), grad_y)
    with torch.no_grad():
        torch.testing.assert_close(L4QMatmul.apply(*args), ste_reference(*args), rtol=0, atol=1e-12)
        merged = w0 + 0.5 * b @ a
        v = (merged - expand(offset, group, in_features)) / expand(step, group, in_features)
        clipped = (v < 0) | (v > levels - 1)
    assert 0 < int(clipped.sum()) < clipped.numel() // 2, "the test needs some clipped entries"
    for name, mine, reference in zip(("x", "A", "B", "step", "offset"), ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16-input-and-w0"])
def test_backward_keeps_no_weight_sized_tensor(dtype):
    """Saved: the inputs themselves, x and W0 in their own dtype (no upcast copy); the gradient of x
    comes back in x's dtype, the trainable ones in theirs."""
    x = torch.randn(2, 16, dtype=torch.float64).to(dtype).requires_grad_()
    w0 = torch.randn(8, 16, dtype=torch.float64).to(dtype)
    a = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(8, 2, dtype=torch.float64, requires_grad=True)
    step = torch.full((8, 2), 0.1, dtype=torch.float64, requires_grad=True)
    offset = torch.full((8, 2), -0.4, dtype=torch.float64, requires_grad=True)
    y = L4QMatmul.apply(x, w0, a, b, step, offset, 1.0, 8, 16, 1.0)
    saved = y.grad_fn.saved_tensors
    assert [t.data_ptr() for t in saved] == [t.data_ptr() for t in (x, w0, a, b, step, offset)]  # inputs only
    assert [t.dtype for t in saved[:2]] == [dtype, dtype]
    grads = torch.autograd.grad(y.sum(), (x, a, step))
    assert [g.dtype for g in grads] == [dtype, torch.float64, torch.float64]


def test_first_forward_equals_the_initial_quantized_model():
    """Default start: RTN's grid (integer zero), so the first forward is the RTN-packed layer."""
    from compress.lowrank.l4q import L4QLinear
    from compress.quant import QuantConfig, QuantizedWeight, QuantLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(64, 16)
    x = torch.randn(3, 7, 64)
    layer = L4QLinear(base, rank=4, alpha=8, bits=3, group_size=32)  # B = 0
    packed = QuantLinear.quantize(base, QuantConfig.uniform(3, 32))
    torch.testing.assert_close(layer(x), packed(x).detach(), rtol=0, atol=1e-5)
    rtn = QuantizedWeight.quantize(base.weight, QuantConfig.uniform(4, 32))  # start from RTN's scales/zeros
    from_rtn = L4QLinear(base, rank=4, alpha=8, bits=4, group_size=32, init=rtn)
    reference = QuantLinear.from_weight(rtn, base.bias)
    torch.testing.assert_close(from_rtn(x), reference(x).detach(), rtol=0, atol=1e-5)
    assert torch.equal(layer.lora_B.weight, torch.zeros(16, 4))
