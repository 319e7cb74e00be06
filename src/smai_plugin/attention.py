"""PEN-Net's attention transfer network (ATN), batched.

One ATN step fills the holes of a feature map ``low`` with patches of ``low`` itself, chosen by
how the surrounding context of ``high`` (the next deeper, half-resolution map) matches known
regions:

1. keys: every ``k x k`` patch of ``high``, L2-normalised; queries: the same patches unnormalised;
2. scores: query-key dot products (a correlation of ``high`` with every key);
3. only keys whose patch holds no hole are valid; softmax with scale 10 over the valid keys;
4. paste: the output at each query is the attention-weighted sum of the ``4 x 4`` patches of
   ``low`` cut with stride 2 (a transposed convolution with the patches as kernels), over 4;
5. optional fusion: four dilated 3x3 convolutions (dilation 1, 2, 4, 8) concatenated.

The public PEN-Net code loops over the batch with per-sample convolution kernels; here every
step is an ``unfold`` / batched ``matmul`` / fold (:func:`fold_patches`) so the whole batch runs
at once and exports to ONNX and OpenVINO.

Local mode (``local=True``, SMAI's fast option): only queries whose patch overlaps the hole
attend; every other query pastes its own patch, which gives ``low`` back there. Full attention
nearly does the same far from the hole (a valid query matches itself best), but local mode
makes the cost follow the hole: with ``query_budget`` below 1, only that share of query
positions (the near-hole ones first) is computed, a fixed number, so it still exports.
Training uses the same rule, computed densely, so training and inference agree.

One knowing change from the public code: invalid keys get a large negative score before the
softmax instead of a zero score, so they add nothing to the softmax denominator (the public
code lets each add ``exp(0)``, which dilutes attention on small valid sets).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

SOFTMAX_SCALE = 10.0
PASTE_KERNEL = 4
PASTE_STRIDE = 2


def hole_at(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a binary hole mask down to ``size``; a cell is a hole if any pixel in it is.

    Args:
        mask (torch.Tensor): Hole mask ``(B, 1, H, W)``, 1 in the hole.
        size (tuple[int, int]): Target ``(h, w)``; ``H`` and ``W`` must be multiples of it.

    Returns:
        torch.Tensor: Binary mask ``(B, 1, h, w)``.

    """
    return F.adaptive_max_pool2d(mask, size)


def fold_patches(patches: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Add up ``4 x 4`` patches placed with stride 2: ``F.fold(patches, size, 4, stride=2, padding=1)``.

    The patch at position ``(m, n)`` puts tap ``(ky, kx)`` on output pixel
    ``(2m - 1 + ky, 2n - 1 + kx)``. Writing ``ky = 2a + ry`` (and ``kx = 2b + rx``), the taps of one
    ``(a, b)`` quarter, interleaved like a pixel shuffle (tap ``(ry, rx)`` of position ``(m, n)`` on
    pixel ``(2m + ry, 2n + rx)``), form a full-resolution image that lands on the output shifted
    by ``2a - 1`` rows and ``2b - 1`` columns: the fold is four shifted slices of one padded
    tensor. The same values as ``F.fold``, without the ``Col2Im`` it exports to (in the CPU
    preset's exported graph ``Col2Im`` took 30 of 124 ms in OpenVINO), and few enough nodes that
    ONNX export and its graph optimiser stay fast.

    Args:
        patches (torch.Tensor): ``(B, C * 16, h * w)``, the ``4 x 4`` patches of ``C`` channels
            at ``h x w`` positions (the layout of ``F.unfold``).
        size (tuple[int, int]): Output ``(2h, 2w)``.

    Returns:
        torch.Tensor: ``(B, C, 2h, 2w)``.

    Example:
        >>> patches = torch.randn(2, 3 * 16, 5 * 4)
        >>> folded = F.fold(patches, (10, 8), 4, stride=2, padding=1)
        >>> torch.allclose(fold_patches(patches, (10, 8)), folded)
        True

    """
    batch = patches.shape[0]
    height, width = size[0] // PASTE_STRIDE, size[1] // PASTE_STRIDE
    taps = patches.reshape(batch, -1, 2, 2, 2, 2, height, width)  # (B, C, a, ry, b, rx, h, w)
    quarters = taps.permute(0, 1, 2, 4, 6, 3, 7, 5).reshape(batch, -1, 2, 2, *size)  # (B, C, a, b, 2h, 2w)
    padded = F.pad(quarters, (1, 1, 1, 1))
    shifted = [
        padded[:, :, a, b, 2 - 2 * a : 2 - 2 * a + size[0], 2 - 2 * b : 2 - 2 * b + size[1]]
        for a in (0, 1)
        for b in (0, 1)
    ]
    return sum(shifted[1:], shifted[0])


class AttentionTransfer(nn.Module):
    """One batched ATN step, ``ATN(low, high, mask)``.

    Args:
        channels (int): Channels of ``low`` (also of the output).
        patch_size (int): Side of the key/query patches on ``high`` (1 or 3 in PEN-Net).
        fuse (bool): Apply the dilated-convolution fusion after the paste.

    Example:
        >>> atn = AttentionTransfer(channels=32, patch_size=3, fuse=True)
        >>> low, high = torch.randn(2, 32, 16, 16), torch.randn(2, 64, 8, 8)
        >>> mask = torch.zeros(2, 1, 64, 64)
        >>> mask[:, :, 16:32, 16:32] = 1
        >>> atn(low, high, mask).shape
        torch.Size([2, 32, 16, 16])

    """

    def __init__(self, channels: int, patch_size: int = 3, fuse: bool = True, local: bool = False) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.local = local
        # Share of query positions computed in local mode; 1.0 computes them all. Set for
        # inference by SmaiModel; training always computes every position.
        self.query_budget = 1.0
        self.fusion = (
            nn.ModuleList(
                nn.Sequential(nn.Conv2d(channels, channels // 4, 3, padding=rate, dilation=rate), nn.ReLU())
                for rate in (1, 2, 4, 8)
            )
            if fuse
            else None
        )

    def attention(
        self,
        high: torch.Tensor,
        mask: torch.Tensor,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of query positions over every key position of ``high``.

        Args:
            high (torch.Tensor): Deeper feature map ``(B, C, h, w)``.
            mask (torch.Tensor): Hole mask ``(B, 1, H, W)`` at any multiple of ``(h, w)``.
            queries (torch.Tensor | None): Query positions ``(B, Q)`` to compute; all if ``None``.

        Returns:
            torch.Tensor: Attention weights ``(B, Q, h*w keys)``.

        """
        patches = F.unfold(high, self.patch_size, padding=self.patch_size // 2).transpose(1, 2)  # (B, L, C*k*k)
        keys = patches / patches.norm(dim=2, keepdim=True).clamp(min=1e-4)
        if queries is not None:
            patches = patches.gather(1, queries[..., None].expand(-1, -1, patches.shape[2]))
        scores = patches @ keys.transpose(1, 2)  # (B, Q, L keys)
        # A key is valid when its k x k patch on the resized mask holds no hole.
        invalid = self.near_hole(mask, high.shape[-2:], self.patch_size)[:, None, :]
        # A large finite negative (not -inf) keeps a map without any valid key free of NaN.
        weights = torch.softmax(scores.masked_fill(invalid, -1e4) * SOFTMAX_SCALE, dim=2)
        return weights.masked_fill(invalid, 0.0).clamp(min=1e-8)

    @staticmethod
    def near_hole(mask: torch.Tensor, size: tuple[int, int], patch_size: int) -> torch.Tensor:
        """Positions of a ``size`` map whose ``patch_size`` patch overlaps the hole, ``(B, h*w)``."""
        hole = hole_at(mask, size)
        return F.max_pool2d(hole, patch_size, stride=1, padding=patch_size // 2).flatten(1) > 0.5

    def forward(self, low: torch.Tensor, high: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fill ``low`` with attention-weighted patches of itself.

        Args:
            low (torch.Tensor): Feature map ``(B, C, 2h, 2w)``.
            high (torch.Tensor): Deeper feature map ``(B, C', h, w)``.
            mask (torch.Tensor): Hole mask ``(B, 1, H, W)``.

        Returns:
            torch.Tensor: ``(B, C, 2h, 2w)``, replacing ``low`` everywhere.

        """
        # One 4x4 patch of `low` per key position (stride 2, so positions match `high`).
        low_patches = F.unfold(low, PASTE_KERNEL, stride=PASTE_STRIDE, padding=1)  # (B, C*16, L)
        if not self.local:
            pasted = low_patches @ self.attention(high, mask).transpose(1, 2)
        else:
            pasted = self._paste_near_hole(low_patches, high, mask)
        output = fold_patches(pasted, low.shape[-2:]) / 4.0
        if self.fusion is None:
            return output
        return torch.cat([branch(output) for branch in self.fusion], dim=1)

    def _paste_near_hole(self, low_patches: torch.Tensor, high: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Local mode: queries near the hole attend; every other query keeps its own patch.

        Pasting its own patch is what a query far from the hole nearly does in full attention
        (it matches itself best), and folding own patches gives ``low`` back. With
        ``query_budget < 1`` only that share of positions is computed (the near-hole ones
        first), which makes the cost follow the hole's size; near-hole queries beyond the
        budget keep their own patch too.
        """
        n_positions = low_patches.shape[2]
        near = self.near_hole(mask, high.shape[-2:], 3)  # (B, L); 3x3 reaches every paste footprint on the hole
        n_queries = min(n_positions, max(1, math.ceil(self.query_budget * n_positions)))
        if n_queries == n_positions:
            attended = low_patches @ self.attention(high, mask).transpose(1, 2)
            return torch.where(near[:, None, :], attended, low_patches)
        # Near-hole positions first, then by position: no ties, so every backend picks the same.
        priority = near.to(high.dtype) * n_positions - torch.arange(n_positions, device=high.device, dtype=high.dtype)
        queries = priority.topk(n_queries, dim=1).indices  # (B, Q)
        index = queries[:, None, :].expand(-1, low_patches.shape[1], -1)
        attended = low_patches @ self.attention(high, mask, queries).transpose(1, 2)  # (B, C*16, Q)
        kept = torch.where(near.gather(1, queries)[:, None, :], attended, low_patches.gather(2, index))
        return low_patches.scatter(2, index, kept)
