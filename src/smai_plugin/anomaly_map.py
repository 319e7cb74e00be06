"""SMAI's scoring: inpaint masked copies of an image and compare the inpaintings with it.

Paper, section 3.3: for each superpixel ``i``, mask it alone, inpaint, and measure how the
inpainting differs from the original inside superpixel ``i``; the anomaly map is the sum of
these per-superpixel maps (eq. 2 with ``1 - SSIM``, eq. 3 with ``L2``). The superpixels
partition the image, so every pixel gets exactly one value. That is ``comparison="per_pass"``.
With ``comparison="reconstruction"`` the in-hole inpaintings of all passes are first assembled
into one reconstruction of the image, which is then compared with the original as a whole: the
measures' windows see inpainted content on both sides of a superpixel border instead of a seam
between an inpainting and the original, and whole-image measures (pretrained features) apply.

:class:`AnomalyMapGenerator` takes any *pass schedule*: a stack of hole masks, one per
inpainting pass, each the union of the superpixels scored in that pass. Leave-one-out is the
schedule with one superpixel per pass. All passes of all images run as batches of at most
``passes_per_batch`` passes per image (``B * passes_per_batch`` inpaintings per generator call),
so memory stays bounded for any number of passes.

With a ``window``, each pass inpaints only a ``window``-sized crop centred on its hole's
bounding box (moved inside the image) instead of the whole image, and its results are added
back at the crop's place. That is the fast ``windowed`` schedule: a leave-one-out pass costs
``window**2 / (H * W)`` of a full one in the convolutions and the square of that in the
attention. Hole pixels outside their window (superpixels wider than the window) keep the
original and score 0.

The maps (one channel per score measure) are smoothed with a Gaussian (sigma 4, as anomalib's
reconstruction models use), so that one noisy pixel does not decide an image score; the torch
model turns them into the anomaly map and the image score (see :mod:`smai_plugin.calibration`).

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

from collections.abc import Sequence
from enum import Enum

import torch
from kornia.filters import gaussian_blur2d
from torch import nn

from ._config import check_int, parse_enum
from .errors import SmaiInputError
from .pennet import composite
from .schedule import crop_passes
from .similarity import Dissimilarity, PretrainedFeatures, ScoreMeasure


class Comparison(str, Enum):
    """What each inpainting is compared with the original as.

    ``per_pass``: the paper's (section 3.3): each pass's inpainting, composited into the
    original, against the original, inside that pass's hole. ``reconstruction``: the in-hole
    inpaintings of all passes are assembled into one reconstruction of the image (the
    superpixels partition it), which is compared with the original as a whole; the measures'
    windows then see inpainted content on both sides of a superpixel border instead of a seam
    between original and inpainting.
    """

    PER_PASS = "per_pass"
    RECONSTRUCTION = "reconstruction"


class AnomalyMapGenerator(nn.Module):
    """Difference maps from a schedule of inpainting passes.

    Args:
        score_measure (ScoreMeasure | str | Sequence[ScoreMeasure | str]): One measure or a
            list of those that compare the inpainting with the original (see
            :class:`~smai_plugin.similarity.Dissimilarity`). Defaults to ``"ssim"``.
        comparison (Comparison | str): ``"per_pass"`` or ``"reconstruction"``; ``features``
            needs ``"reconstruction"``. Defaults to ``"per_pass"``.
        passes_per_batch (int): Most passes per image in one generator call (the call inpaints
            ``B * passes_per_batch`` images); bounds memory. Defaults to ``16``.
        sigma (float): Standard deviation of the Gaussian smoothing of the maps; ``0`` turns
            smoothing off. Defaults to ``4.0``.
        pretrained (PretrainedFeatures | None): The backbone of the ``features`` measure, if
            shared (see :class:`~smai_plugin.similarity.Dissimilarity`). Defaults to ``None``.

    """

    def __init__(
        self,
        score_measure: ScoreMeasure | str | Sequence[ScoreMeasure | str] = ScoreMeasure.SSIM,
        comparison: Comparison | str = Comparison.PER_PASS,
        passes_per_batch: int = 16,
        sigma: float = 4.0,
        pretrained: PretrainedFeatures | None = None,
    ) -> None:
        super().__init__()
        self.comparison = parse_enum(Comparison, comparison, "comparison")
        self.dissimilarity = Dissimilarity(score_measure, pretrained)
        if self.comparison == Comparison.PER_PASS and ScoreMeasure.FEATURES in self.measures:
            msg = "score_measure 'features' compares whole images: use it with comparison='reconstruction'."
            raise SmaiInputError(msg)
        check_int(passes_per_batch, "passes_per_batch")
        if sigma < 0:
            msg = f"sigma must be non-negative, got {sigma}."
            raise SmaiInputError(msg)
        self.passes_per_batch = passes_per_batch
        self.sigma = sigma

    @property
    def measures(self) -> tuple[ScoreMeasure, ...]:
        """The measures, one map channel each."""
        return self.dissimilarity.measures

    def forward(
        self,
        generator: nn.Module,
        images: torch.Tensor,
        holes: torch.Tensor,
        window: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Inpaint every pass and compare the inpaintings with the images.

        Args:
            generator (nn.Module): Inpainting network, ``generator(images, masks) -> (output, ...)``.
            images (torch.Tensor): Images in ``[-1, 1]``, ``(B, 3, H, W)``.
            holes (torch.Tensor): One hole mask per pass, ``(B, P, H, W)``; a pixel's value in
                the map comes from the passes whose hole covers it.
            window (tuple[int, int] | None): Crop ``(h, w)`` around its hole that each pass
                inpaints, at most ``(H, W)``; ``None`` inpaints the whole image. Defaults to ``None``.

        Returns:
            torch.Tensor: Smoothed difference maps ``(B, M, H, W)``, one channel per measure.

        """
        return self.compare(generator, images, holes, window)[0]

    def compare(
        self,
        generator: nn.Module,
        images: torch.Tensor,
        holes: torch.Tensor,
        window: tuple[int, int] | None = None,
        reconstruct: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inpaint every pass; return the difference maps and, if assembled, the reconstruction.

        The reconstruction is each pixel's inpainting by the passes whose hole covers it (their
        mean where holes overlap), and the original where no pass inpainted it. ``comparison=
        "reconstruction"`` always assembles it (it is what is compared); ``"per_pass"`` only when
        ``reconstruct`` asks, at the cost of four more channels gathered per pass.

        Args:
            generator (nn.Module): Inpainting network (see :meth:`forward`).
            images (torch.Tensor): Images in ``[-1, 1]``, ``(B, 3, H, W)``.
            holes (torch.Tensor): One hole mask per pass, ``(B, P, H, W)``.
            window (tuple[int, int] | None): Crop each pass inpaints (see :meth:`forward`).
            reconstruct (bool): Assemble the reconstruction with ``"per_pass"`` too. Defaults to ``False``.

        Returns:
            tuple[torch.Tensor, torch.Tensor | None]: The maps ``(B, M, H, W)`` and the
            reconstruction in ``[-1, 1]``, ``(B, 3, H, W)``, or ``None``.

        """
        batch, n_passes, height, width = holes.shape
        crop = window or (height, width)
        per_pass = self.comparison == Comparison.PER_PASS
        assemble = reconstruct or not per_pass
        colours = images.shape[1]
        # Per pass: the in-hole differences; to assemble: the in-hole inpainting and the hole itself.
        channels = (len(self.measures) if per_pass else 0) + (colours + 1 if assemble else 0)
        total = images.new_zeros(batch, channels, height * width)
        # Chunks follow the number of passes only (fixed by the configuration), never the batch
        # size, so the loop traces the same for any batch size at export.
        for start in range(0, n_passes, self.passes_per_batch):
            chunk = holes[:, start : start + self.passes_per_batch]  # (B, p, H, W)
            originals, masks, index = crop_passes(images, chunk, crop)
            output = generator(originals, masks)[0]
            values = []
            if per_pass:
                # The composite (original outside the hole): SSIM windows at the hole's border
                # see only the hole's new content as different.
                values.append(self.dissimilarity(composite(originals, output, masks), originals) * masks)
            if assemble:
                values += [output * masks, masks]
            values = torch.cat(values, dim=1)
            values = values.reshape(batch, -1, channels, values.shape[-2] * values.shape[-1]).transpose(1, 2)
            total = total.scatter_add(2, index.flatten(1)[:, None].expand(-1, channels, -1), values.flatten(2))
        total = total.reshape(batch, channels, height, width)
        reconstruction = None
        if assemble:
            inpainted, covered = total[:, -colours - 1 : -1], total[:, -1:]
            # Pixels no pass inpainted (outside every window) keep the original: they score 0.
            reconstruction = inpainted / covered.clamp(min=1) + images * (covered == 0)
        maps = total[:, : len(self.measures)] if per_pass else self.dissimilarity(reconstruction, images)
        return smooth(maps, self.sigma), reconstruction


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of maps ``(B, M, H, W)`` with ``sigma`` (kornia); identity when ``sigma`` is 0."""
    if sigma == 0:
        return maps
    kernel = 2 * int(4.0 * sigma + 0.5) + 1
    # Each measure's map blurred as an image of its own: the grouped convolution that several
    # channels would need never finishes in OpenVINO's bf16 CPU inference (2026.4, measured).
    batch, channels, height, width = maps.shape
    flat = maps.reshape(batch * channels, 1, height, width)
    return gaussian_blur2d(flat, (kernel, kernel), (sigma, sigma)).reshape(batch, channels, height, width)
