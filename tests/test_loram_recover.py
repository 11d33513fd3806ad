"""LoRAM recovery: the recovered update is exactly zero on removed neurons and equals the trained update
on kept ones, for every projection of a GQA layer (independent check by index arithmetic)."""

import pytest
import torch

from compress.prune.recover import kept_positions, recover_factors
from compress.prune.units import LayerUnits

UNIT = LayerUnits(0, "model.layers.0", kv_groups=4, group_heads=2, head_dim=8, channels=96)
REMOVED = {"kv_groups": [1, 3], "channels": list(range(0, 96, 3))}
HIDDEN = 64
SHAPES = {"q_proj": (64, HIDDEN), "k_proj": (32, HIDDEN), "v_proj": (32, HIDDEN), "o_proj": (HIDDEN, 64),
          "gate_proj": (96, HIDDEN), "up_proj": (96, HIDDEN), "down_proj": (HIDDEN, 96)}


def test_kept_positions_follow_the_kv_groups():
    assert kept_positions(UNIT, "k_proj", REMOVED).tolist() == list(range(0, 8)) + list(range(16, 24))
    assert kept_positions(UNIT, "q_proj", REMOVED).tolist() == list(range(0, 16)) + list(range(32, 48))
    assert kept_positions(UNIT, "o_proj", REMOVED).tolist() == kept_positions(UNIT, "q_proj", REMOVED).tolist()
    assert len(kept_positions(UNIT, "down_proj", REMOVED)) == 64


@pytest.mark.parametrize("leaf", list(SHAPES))
def test_recovered_update_is_zero_on_removed_and_trained_on_kept(leaf):
    out_features, in_features = SHAPES[leaf]
    kept = kept_positions(UNIT, leaf, REMOVED)
    rows_pruned = leaf not in ("o_proj", "down_proj")
    small_out, small_in = (kept.numel(), in_features) if rows_pruned else (out_features, kept.numel())
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, small_in, generator=generator, dtype=torch.float64)
    b = torch.randn(small_out, 4, generator=generator, dtype=torch.float64)
    full_a, full_b = recover_factors(leaf, a, b, kept, (out_features, in_features))
    assert full_a.shape == (4, in_features) and full_b.shape == (out_features, 4)
    removed = torch.ones(out_features if rows_pruned else in_features, dtype=torch.bool)
    removed[kept] = False
    # exact on the factors (placement only, no arithmetic): B's kept rows are b, or A's kept columns are a
    if rows_pruned:
        assert torch.equal(full_b[kept], b) and torch.equal(full_b[removed], torch.zeros_like(full_b[removed]))
        assert torch.equal(full_a, a)
    else:
        assert torch.equal(full_a[:, kept], a) and torch.equal(full_a[:, removed], torch.zeros_like(full_a[:, removed]))
        assert torch.equal(full_b, b)
    # and so on the update: zero where removed (exactly: every product has a zero factor), b @ a where kept
    # (to float64 rounding: BLAS may sum a wider matrix's dot products in another order)
    update, small = full_b @ full_a, b @ a
    if rows_pruned:
        assert torch.equal(update[removed], torch.zeros_like(update[removed]))
        torch.testing.assert_close(update[kept], small, rtol=1e-12, atol=1e-12)
    else:
        assert torch.equal(update[:, removed], torch.zeros_like(update[:, removed]))
        torch.testing.assert_close(update[:, kept], small, rtol=1e-12, atol=1e-12)


def test_mismatched_factors_are_refused():
    kept = kept_positions(UNIT, "q_proj", REMOVED)
    with pytest.raises(ValueError, match="q_proj: factors"):
        recover_factors("q_proj", torch.zeros(4, HIDDEN), torch.zeros(64, 4), kept, SHAPES["q_proj"])


def test_sparsity_masks_and_alignment_keep_zeros():
    from compress.prune.sparsity import KeepSparse, magnitude_mask, sparsify

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 16, generator=generator)
    semi = magnitude_mask(weight, "semi")
    assert torch.equal(semi.view(8, 4, 4).sum(dim=2), torch.full((8, 4), 2))
    kept_magnitudes = weight.abs().view(8, 4, 4)
    assert bool((kept_magnitudes[semi.view(8, 4, 4)].view(8, 4, 2).min(dim=2).values
                 >= kept_magnitudes[~semi.view(8, 4, 4)].view(8, 4, 2).max(dim=2).values).all())
    assert int((~magnitude_mask(weight, "unstructured", 0.25)).sum()) == 32
    layer = torch.nn.Linear(16, 8)
    masks = sparsify({"l": layer}, "unstructured", 0.5)
    keeper = KeepSparse({"l": layer}, masks)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 16, generator=generator)).sum().backward()
    optimizer.step()
    assert torch.count_nonzero(layer.weight[~masks["l"]]) > 0  # the step moved pruned weights...
    keeper.after_step(1)
    assert torch.count_nonzero(layer.weight[~masks["l"]]) == 0  # ...and the hook zeroes them again
