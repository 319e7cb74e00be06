"""Batched attention transfer equals a straightforward per-sample implementation."""

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from smai_plugin.attention import SOFTMAX_SCALE, AttentionTransfer, hole_at, paste_patches


def reference_atn(atn: AttentionTransfer, low: torch.Tensor, high: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PEN-Net's formulation, one sample at a time: keys as convolution kernels, paste as a transposed convolution."""
    k, pad = atn.patch_size, atn.patch_size // 2
    outputs = []
    for low_i, high_i, mask_i in zip(low, high, mask, strict=True):
        channels, h, w = high_i.shape
        keys = F.pad(high_i, (pad, pad, pad, pad)).unfold(1, k, 1).unfold(2, k, 1)  # (C, h, w, k, k)
        keys = keys.permute(1, 2, 0, 3, 4).reshape(h * w, channels, k, k)
        keys = keys / keys.flatten(1).norm(dim=1).clamp(min=1e-4)[:, None, None, None]
        scores = F.conv2d(high_i[None], keys, padding=pad)[0]  # (keys, h, w)
        hole = hole_at(mask_i[None], (h, w))
        valid = (F.max_pool2d(hole, k, stride=1, padding=pad) <= 0.5).flatten().float()  # (keys,)
        logits = scores * SOFTMAX_SCALE
        logits = torch.where(valid[:, None, None] > 0, logits, torch.full_like(logits, -1e4 * SOFTMAX_SCALE))
        weights = (torch.softmax(logits, dim=0) * valid[:, None, None]).clamp(min=1e-8)
        patches = F.pad(low_i, (1, 1, 1, 1)).unfold(1, 4, 2).unfold(2, 4, 2)  # (C, h, w, 4, 4)
        patches = patches.permute(1, 2, 0, 3, 4).reshape(h * w, low_i.shape[0], 4, 4)
        out = F.conv_transpose2d(weights[None], patches, stride=2, padding=1) / 4.0
        outputs.append(out[0])
    output = torch.stack(outputs)
    if atn.fusion is None:
        return output
    return torch.cat([branch(output) for branch in atn.fusion], dim=1)


@pytest.mark.parametrize(("patch_size", "fuse"), [(3, True), (1, False)])
def test_batched_equals_per_sample(patch_size: int, fuse: bool) -> None:
    torch.manual_seed(0)
    atn = AttentionTransfer(channels=8, patch_size=patch_size, fuse=fuse)
    low, high = torch.randn(3, 8, 16, 16), torch.randn(3, 12, 8, 8)
    mask = torch.zeros(3, 1, 64, 64)
    mask[0, :, 10:30, 20:40] = 1
    mask[1, :, 40:64, 0:16] = 1  # sample 2 has no hole: every key is valid
    expected = reference_atn(atn, low, high, mask)
    torch.testing.assert_close(atn(low, high, mask), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(2, 2), (10, 8), (32, 32)])
def test_paste_patches_equals_folding_the_mixed_patches(size: tuple[int, int]) -> None:
    low = torch.randn(3, 5, *size)
    positions = (size[0] // 2) * (size[1] // 2)
    weights = torch.softmax(torch.randn(3, positions, positions) * 3, dim=2)  # attention rows
    patches = F.unfold(low, 4, stride=2, padding=1)  # PEN-Net's paste, spelled out
    expected = F.fold(patches @ weights.transpose(1, 2), size, 4, stride=2, padding=1) / 4
    torch.testing.assert_close(paste_patches(low, weights), expected, rtol=0, atol=1e-5)


def test_hole_keys_get_no_attention_and_full_hole_stays_finite() -> None:
    atn = AttentionTransfer(channels=4, patch_size=3, fuse=False)
    high = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, :16] = 1  # top half of sample 0 is a hole
    mask[1] = 1  # sample 1 is all hole: no valid key
    weights = atn.attention(high, mask)
    hole_keys = F.max_pool2d(hole_at(mask, (8, 8)), 3, stride=1, padding=1).flatten(1) > 0.5
    assert weights[0][:, hole_keys[0]].max() <= 1e-8
    torch.testing.assert_close(weights[0].sum(1), torch.ones(64), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(weights).all()
    assert torch.isfinite(atn(torch.randn(2, 4, 16, 16), high, mask)).all()


def test_local_attention_keeps_low_away_from_the_hole_and_budget_is_exact() -> None:
    torch.manual_seed(0)
    atn = AttentionTransfer(channels=8, patch_size=3, fuse=False, local=True)
    low, high = torch.randn(2, 8, 32, 32), torch.randn(2, 12, 16, 16)
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 8:20, 40:52] = 1
    mask[1, :, 30:44, 4:16] = 1
    dense = atn(low, high, mask)
    far = F.max_pool2d(F.interpolate(mask, size=(32, 32)), 9, stride=1, padding=4) == 0
    # Away from the hole each query pastes its own patch: fold(unfold(low)) / 4, which is `low`
    # except on the border, which fewer patches cover (as in full attention).
    own = F.fold(F.unfold(low, 4, stride=2, padding=1), (32, 32), 4, stride=2, padding=1) / 4
    torch.testing.assert_close(dense[far.expand_as(dense)], own[far.expand_as(own)])
    torch.testing.assert_close(own[..., 1:-1, 1:-1], low[..., 1:-1, 1:-1])
    full = AttentionTransfer(channels=8, patch_size=3, fuse=False)(low, high, mask)
    hole = F.interpolate(mask, size=(32, 32)) > 0
    torch.testing.assert_close(dense[hole.expand_as(dense)], full[hole.expand_as(full)])  # same fill in the hole
    # The near-hole region is 7x7 of 256 positions at most here: a 25% budget computes all of it.
    atn.query_budget = 0.25
    torch.testing.assert_close(atn(low, high, mask), dense)
    # A budget too small for the region changes the result (the test can fail).
    atn.query_budget = 0.02
    assert not torch.allclose(atn(low, high, mask), dense)
