"""SMAI's scoring: inpaint masked copies of an image and compare them with it inside the holes.

Paper, section 3.3: for each superpixel ``i``, mask it alone, inpaint, and measure how the
inpainting differs from the original inside superpixel ``i``; the anomaly map is the sum of
these per-superpixel maps (eq. 2 with ``1 - SSIM``, eq. 3 with ``L2``). The superpixels
partition the image, so every pixel gets exactly one value.

:class:`AnomalyMapGenerator` takes any *pass schedule*: a stack of hole masks, one per
inpainting pass, each the union of the superpixels scored in that pass. Leave-one-out is the
schedule with one superpixel per pass. All passes of all images run as batches of at most
``passes_per_batch`` passes per image (``B * passes_per_batch`` inpaintings per generator call),
so memory stays bounded for any number of passes.

The image score is the maximum of the anomaly map after Gaussian smoothing (sigma 4, as
anomalib's reconstruction models use): the smoothing keeps one noisy pixel from deciding the
score, and the smoothed map is what is returned as ``anomaly_map``.

Example:
    >>> from smai_plugin.pennet import PenNetGenerator
    >>> generator = PenNetGenerator(base_channels=8).eval()
    >>> images = torch.rand(1, 3, 64, 64) * 2 - 1
    >>> holes = torch.zeros(1, 4, 64, 64)
    >>> for i in range(4):
    ...     holes[0, i, (i // 2) * 32:(i // 2 + 1) * 32, (i % 2) * 32:(i % 2 + 1) * 32] = 1
    >>> scorer = AnomalyMapGenerator(score_measure="l2", passes_per_batch=2)
    >>> scorer(generator, images, holes).shape
    torch.Size([1, 1, 64, 64])

"""

from enum import Enum

import torch
from kornia.filters import gaussian_blur2d
from torch import nn

from ._config import parse_enum
from .loss import ssim_map


class ScoreMeasure(str, Enum):
    """How an inpainting is compared with the original (paper, eq. 2 and eq. 3)."""

    SSIM = "ssim"
    L2 = "l2"


def dissimilarity(inpainted: torch.Tensor, original: torch.Tensor, measure: ScoreMeasure) -> torch.Tensor:
    """Per-pixel difference of two image batches in ``[-1, 1]``, ``(N, 1, H, W)``.

    ``ssim``: ``1 - SSIM`` (11x11 Gaussian window); ``l2``: squared error in ``[0, 1]`` units,
    averaged over the colour channels.
    """
    if measure == ScoreMeasure.SSIM:
        return 1 - ssim_map(inpainted, original)
    return ((inpainted - original) / 2).pow(2).mean(1, keepdim=True)


class AnomalyMapGenerator(nn.Module):
    """Anomaly map from a schedule of inpainting passes.

    Args:
        score_measure (ScoreMeasure | str): ``"ssim"`` or ``"l2"``. Defaults to ``"ssim"``.
        passes_per_batch (int): Most passes per image in one generator call (the call inpaints
            ``B * passes_per_batch`` images); bounds memory. Defaults to ``16``.
        sigma (float): Standard deviation of the Gaussian smoothing of the map; ``0`` turns
            smoothing off. Defaults to ``4.0``.

    """

    def __init__(
        self,
        score_measure: ScoreMeasure | str = ScoreMeasure.SSIM,
        passes_per_batch: int = 16,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.score_measure = parse_enum(ScoreMeasure, score_measure, "score_measure")
        if passes_per_batch < 1:
            msg = f"passes_per_batch must be at least 1, got {passes_per_batch}."
            raise ValueError(msg)
        if sigma < 0:
            msg = f"sigma must be non-negative, got {sigma}."
            raise ValueError(msg)
        self.passes_per_batch = passes_per_batch
        self.sigma = sigma

    def forward(self, generator: nn.Module, images: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
        """Inpaint every pass and accumulate the in-hole differences.

        Args:
            generator (nn.Module): Inpainting network, ``generator(images, masks) -> (output, ...)``.
            images (torch.Tensor): Images in ``[-1, 1]``, ``(B, 3, H, W)``.
            holes (torch.Tensor): One hole mask per pass, ``(B, P, H, W)``; a pixel's value in
                the map comes from the passes whose hole covers it.

        Returns:
            torch.Tensor: Anomaly map ``(B, 1, H, W)``.

        """
        batch, n_passes, height, width = holes.shape
        anomaly_map = images.new_zeros(batch, 1, height, width)
        # Chunks follow the number of passes only (fixed by the configuration), never the batch
        # size, so the loop traces the same for any batch size at export.
        for start in range(0, n_passes, self.passes_per_batch):
            chunk = holes[:, start : start + self.passes_per_batch]  # (B, p, H, W)
            n_chunk = chunk.shape[1]
            masks = chunk.reshape(batch * n_chunk, 1, height, width)
            originals = images[:, None].expand(-1, n_chunk, -1, -1, -1).reshape(batch * n_chunk, 3, height, width)
            output = generator(originals, masks)[0]
            # Compare the composite (original outside the hole), so SSIM windows at the hole's
            # border see only the hole's new content as different.
            composite = originals * (1 - masks) + output * masks
            difference = dissimilarity(composite, originals, self.score_measure) * masks
            anomaly_map = anomaly_map + difference.reshape(batch, n_chunk, height, width).sum(1, keepdim=True)
        return self.smooth(anomaly_map)

    def smooth(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Gaussian smoothing with ``sigma`` (kornia); identity when ``sigma`` is 0."""
        if self.sigma == 0:
            return anomaly_map
        kernel = 2 * int(4.0 * self.sigma + 0.5) + 1
        return gaussian_blur2d(anomaly_map, (kernel, kernel), (self.sigma, self.sigma))
