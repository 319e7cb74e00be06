"""PyTorch model of SMAI: a superpixel masker, PEN-Net, and the superpixel scoring.

In train mode the model inpaints a batch under given hole masks (the Lightning model draws
the holes with :func:`random_superpixel_holes`). In eval mode it takes images and returns
anomalib's :class:`~anomalib.data.InferenceBatch`: the superpixel masker splits each image,
the scoring schedule decides which superpixels are masked together in each pass, PEN-Net
inpaints every pass, and :class:`~smai_plugin.anomaly_map.AnomalyMapGenerator` turns the
in-hole differences into the anomaly map.

Everything in eval mode has shapes fixed by the configuration (``n_superpixels`` masks, a
fixed number of passes), so the whole pipeline traces for export.

Example:
    >>> model = SmaiModel(n_superpixels=16, base_channels=8).eval()
    >>> output = model(torch.rand(2, 3, 64, 64))
    >>> output.pred_score.shape, output.anomaly_map.shape
    (torch.Size([2]), torch.Size([2, 1, 64, 64]))

"""

from enum import Enum

import torch
from anomalib.data import InferenceBatch
from torch import nn

from ._config import parse_enum
from .anomaly_map import AnomalyMapGenerator, ScoreMeasure
from .pennet import N_LEVELS, PenNetGenerator
from .superpixel import SuperpixelMasker

SIZE_MULTIPLE = 2**N_LEVELS


class ScoringMode(str, Enum):
    """Which superpixels are masked together in one inpainting pass at inference.

    ``leave_one_out``: the paper's schedule, one superpixel per pass (``n_superpixels`` passes).
    """

    LEAVE_ONE_OUT = "leave_one_out"


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """Map images from ``[0, 1]`` (anomalib's pre-processor output) to PEN-Net's ``[-1, 1]``."""
    return images * 2 - 1


def random_superpixel_holes(superpixels: torch.Tensor, n_masked: int) -> torch.Tensor:
    """Hole mask made of ``n_masked`` random non-empty superpixels per image (paper, section 3.2).

    Args:
        superpixels (torch.Tensor): Superpixel masks ``(B, K, H, W)``.
        n_masked (int): Superpixels to mask per image (fewer if an image has fewer non-empty ones).

    Returns:
        torch.Tensor: Hole masks ``(B, 1, H, W)``.

    Example:
        >>> superpixels = torch.eye(4).reshape(1, 4, 2, 2)  # 4 one-pixel superpixels
        >>> int(random_superpixel_holes(superpixels, 3).sum())
        3

    """
    non_empty = superpixels.flatten(2).amax(2) > 0  # (B, K)
    priority = torch.rand(non_empty.shape, device=superpixels.device).masked_fill(~non_empty, -1.0)
    chosen = priority.topk(min(n_masked, superpixels.shape[1]), dim=1).indices
    selected = torch.zeros_like(non_empty).scatter(1, chosen, True) & non_empty
    return (superpixels * selected[:, :, None, None].to(superpixels.dtype)).sum(1, keepdim=True)


class SmaiModel(nn.Module):
    """SMAI: superpixel masking and inpainting.

    Args:
        n_superpixels (int): Superpixels per image (the paper's m). Defaults to ``77``.
        scoring (ScoringMode | str): Inference schedule. Defaults to ``"leave_one_out"``.
        score_measure (ScoreMeasure | str): ``"ssim"`` (eq. 2) or ``"l2"`` (eq. 3).
            Defaults to ``"ssim"``.
        base_channels (int): PEN-Net width ``c``. Defaults to ``32``.
        compactness (float): SLIC compactness. Defaults to ``10.0``.
        slic_iterations (int): SLIC iterations. Defaults to ``10``.
        passes_per_batch (int): Most inpaintings per generator call at inference. Defaults to ``16``.
        sigma (float): Gaussian smoothing of the anomaly map. Defaults to ``4.0``.

    """

    def __init__(
        self,
        n_superpixels: int = 77,
        scoring: ScoringMode | str = ScoringMode.LEAVE_ONE_OUT,
        score_measure: ScoreMeasure | str = ScoreMeasure.SSIM,
        base_channels: int = 32,
        compactness: float = 10.0,
        slic_iterations: int = 10,
        passes_per_batch: int = 16,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.scoring = parse_enum(ScoringMode, scoring, "scoring")
        self.masker = SuperpixelMasker(n_superpixels, compactness, slic_iterations)
        self.generator = PenNetGenerator(base_channels)
        self.anomaly_map_generator = AnomalyMapGenerator(score_measure, passes_per_batch, sigma)

    @staticmethod
    def check_shape(images: torch.Tensor) -> None:
        """Raise a clear error for inputs PEN-Net cannot take.

        Raises:
            ValueError: If ``images`` is not ``(B, 3, H, W)`` with ``H`` and ``W`` multiples of 64.

        """
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"SMAI expects RGB image batches of shape (B, 3, H, W), got {tuple(images.shape)}."
            raise ValueError(msg)
        height, width = images.shape[-2:]
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            msg = (
                f"SMAI needs image height and width that are multiples of {SIZE_MULTIPLE} (PEN-Net halves "
                f"them {N_LEVELS} times), got {height}x{width}. Resize with the pre-processor, e.g. "
                f"Smai(image_size=(256, 256))."
            )
            raise ValueError(msg)

    def forward(
        self,
        images: torch.Tensor,
        holes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | InferenceBatch:
        """Inpaint under ``holes`` (train mode) or score ``images`` (eval mode).

        Args:
            images (torch.Tensor): RGB images in ``[0, 1]``, ``(B, 3, H, W)``.
            holes (torch.Tensor | None): Train mode only: hole masks ``(B, 1, H, W)``.

        Returns:
            Train mode: the inpainting in ``[-1, 1]`` and PEN-Net's pyramid outputs.
            Eval mode: ``InferenceBatch`` with ``pred_score`` ``(B,)`` and ``anomaly_map``
            ``(B, 1, H, W)``.

        """
        self.check_shape(images)
        if self.training:
            if holes is None:
                msg = "In train mode SmaiModel inpaints under given holes: call model(images, holes)."
                raise ValueError(msg)
            return self.generator(to_signed(images), holes)
        anomaly_map = self.anomaly_map_generator(self.generator, to_signed(images), self.pass_holes(images))
        return InferenceBatch(pred_score=anomaly_map.amax(dim=(1, 2, 3)), anomaly_map=anomaly_map)

    def pass_holes(self, images: torch.Tensor) -> torch.Tensor:
        """Hole mask of every inference pass, ``(B, passes, H, W)``, following ``scoring``."""
        return self.masker(images)
