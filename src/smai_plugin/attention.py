"""PEN-Net's attention transfer network (ATN), batched.

One ATN step fills the holes of a feature map ``low`` with patches of ``low`` itself, chosen by
how the surrounding context of ``high`` (the next deeper, half-resolution map) matches known
regions:

1. keys: every ``k x k`` patch of ``high``, L2-normalised; queries: the same patches unnormalised;
2. scores: query-key dot products (a correlation of ``high`` with every key);
3. only keys whose patch holds no hole are valid; softmax with scale 10 over the valid keys;
4. paste: the output at each query is the attention-weighted sum of the ``4 x 4`` patches of
   ``low`` cut with stride 2 (a transposed convolution with the patches as kernels), over 4
   (:func:`paste_patches`);
5. optional fusion: four dilated 3x3 convolutions (dilation 1, 2, 4, 8) concatenated.

The public PEN-Net code loops over the batch with per-sample convolution kernels; here every
step is batched tensor algebra (``unfold``, ``matmul``, pads) so the whole batch runs at once
and exports to ONNX and OpenVINO.

Local mode (``local=True``, SMAI's fast option): only queries whose patch overlaps the hole
attend; every other query pastes its own patch, which gives ``low`` back there. Full attention
nearly does the same far from the hole (a valid query matches itself best), but local mode
makes the attention's cost follow the hole: with ``query_budget`` below 1, only that share of
query positions (the near-hole ones first) is computed, a fixed number, so it still exports
(the paste, :func:`paste_patches`, stays dense).
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


def paste_patches(low: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Paste attention-weighted ``4 x 4`` patches of ``low``: PEN-Net's paste, without the patches.

    PEN-Net cuts the ``4 x 4`` patches of ``low`` with stride 2 at every key position, mixes them
    with the weights of each query position and adds the mixed patches up where the queries sit
    (``F.fold(F.unfold(low, 4, stride=2, padding=1) @ weights.T, ...)``, a transposed
    convolution). Split into its four stride-2 phases (``pixel_unshuffle``), the padded ``low``
    becomes ``4C`` channels on an ``(h + 1) x (w + 1)`` grid, and a patch is four positions of
    it: its key's position shifted by ``(a, b)``, ``a, b in {0, 1}``; the mixed patch lands on its
    query's position shifted the same way. So the four shifts can move onto the weights: the
    weights summed over the four diagonal shifts, multiplied with the phases, give the output's
    phases. The same sums in another order, with about a third of the patches' multiply-adds and
    no patch tensors to cut, transpose and fold (the deployed CPU preset ran faster in OpenVINO).

    Args:
        low (torch.Tensor): Feature map ``(B, C, 2h, 2w)``.
        weights (torch.Tensor): ``(B, h*w queries, h*w keys)``, positions of the ``h x w`` grid.

    Returns:
        torch.Tensor: ``(B, C, 2h, 2w)``, the pasted patches over 4.

    Example:
        >>> low, weights = torch.randn(2, 3, 8, 6), torch.rand(2, 12, 12)
        >>> patches = F.unfold(low, 4, stride=2, padding=1)
        >>> pasted = F.fold(patches @ weights.transpose(1, 2), (8, 6), 4, stride=2, padding=1) / 4
        >>> torch.allclose(paste_patches(low, weights), pasted, atol=1e-6)
        True

    """
    batch, _, height, width = low.shape
    rows, cols = height // PASTE_STRIDE, width // PASTE_STRIDE  # the weights' grid
    size = (rows + 1) * (cols + 1)  # the phases' grid
    phases = F.pixel_unshuffle(F.pad(low, (1, 1, 1, 1)), PASTE_STRIDE).flatten(2)  # (B, 4C, size)
    # The weights on the phases' grid without its last row: a zero after each row of keys and of
    # queries. There a shift by (a, b) adds a * (cols + 1) + b to a flat position, so each shifted
    # copy is one pad of long rows (OpenVINO pads short rows slowly).
    wide = F.pad(weights.reshape(batch, rows * cols * rows, cols), (0, 1))
    wide = F.pad(wide.reshape(batch * rows, cols, -1), (0, 0, 0, 1)).reshape(batch, rows * (cols + 1), -1)
    shifted = []
    for shift in (0, 1, cols + 1, cols + 2):
        kept = min(wide.shape[-1], size - shift)  # shift (1, 1) pushes the last zero past the grid
        shifted.append(F.pad(wide[:, :kept, :kept], (shift, size - shift - kept) * 2))
    spread = sum(shifted[1:], shifted[0])
    pasted = (phases @ spread.transpose(1, 2)).reshape(batch, -1, rows + 1, cols + 1)
    return F.pixel_shuffle(pasted, PASTE_STRIDE)[:, :, 1 : height + 1, 1 : width + 1] / 4.0


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
        patches = F.unfold(high, self.patch_size, padding=self.patch_size // 2)  # (B, C*k*k, L)
        keys = patches / patches.norm(dim=1, keepdim=True).clamp(min=1e-4)
        if queries is not None:
            patches = patches.gather(2, queries[:, None, :].expand(-1, patches.shape[1], -1))
        # Patches stay (B, C*k*k, L): the one transpose is the product's own (OpenVINO fuses it).
        scores = patches.transpose(1, 2) @ keys  # (B, Q, L keys)
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
        weights = self._local_weights(high, mask) if self.local else self.attention(high, mask)
        output = paste_patches(low, weights)
        if self.fusion is None:
            return output
        return torch.cat([branch(output) for branch in self.fusion], dim=1)

    def _local_weights(self, high: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Local mode's weights ``(B, h*w, h*w)``: queries near the hole attend, every other query keeps its own patch.

        Pasting its own patch is what a query far from the hole nearly does in full attention
        (it matches itself best), and pasting own patches gives ``low`` back. With
        ``query_budget < 1`` only that share of positions is computed (the near-hole ones
        first), which makes the attention's cost follow the hole's size; near-hole queries
        beyond the budget keep their own patch too.
        """
        n_positions = high.shape[-2] * high.shape[-1]
        near = self.near_hole(mask, high.shape[-2:], 3)  # (B, L); 3x3 reaches every paste footprint on the hole
        own = torch.eye(n_positions, device=high.device, dtype=high.dtype).expand(high.shape[0], -1, -1)
        n_queries = min(n_positions, max(1, math.ceil(self.query_budget * n_positions)))
        if n_queries == n_positions:
            return torch.where(near[..., None], self.attention(high, mask), own)
        # Near-hole positions first, then by position: no ties, so every backend picks the same.
        priority = near.to(high.dtype) * n_positions - torch.arange(n_positions, device=high.device, dtype=high.dtype)
        queries = priority.topk(n_queries, dim=1).indices  # (B, Q)
        rows = queries[..., None].expand(-1, -1, n_positions)
        attention = self.attention(high, mask, queries)  # (B, Q, L)
        attended = torch.where(near.gather(1, queries)[..., None], attention, own.gather(1, rows))
        return own.scatter(1, rows, attended)
