"""How an inpainting is compared with the original: SSIM, L2 and MSGMS maps.

Every function takes image batches in PEN-Net's ``[-1, 1]`` range and returns a per-pixel map
``(N, 1, H, W)``, averaged over the colour channels:

- :func:`ssim_map`: SSIM with an 11x11 Gaussian window (kornia), the paper's eq. 2 uses
  ``1 - SSIM``;
- :func:`msgms_distance`: ``1 -`` multi-scale gradient magnitude similarity (GMS of Xue et al., 2014, over
  four scales, as RIAD and the Inpainting Transformer score with it): edges that moved,
  vanished or appeared count, flat colour shifts do not;
- :func:`feature_distance`: cosine distance of pretrained ImageNet features
  (:class:`PretrainedFeatures`, the offline EfficientNet-Lite0 of :mod:`smai_plugin.backbone`),
  a difference in what the image shows rather than in its pixels;
- :class:`Dissimilarity`: the maps of one or several of these measures (high = different).

The :class:`ScoreMeasure` ``memory`` is not a comparison of the two: it measures the original
against a memory of normal patch features (:mod:`smai_plugin.memory`), an opinion that does not
depend on the inpainting.

Example:
    >>> images = torch.rand(2, 3, 64, 64) * 2 - 1
    >>> measure = Dissimilarity(["msgms", "l2"])
    >>> maps = measure(images, images)
    >>> maps.shape, float(maps.abs().max())
    (torch.Size([2, 2, 64, 64]), 0.0)

"""

from collections.abc import Sequence
from enum import Enum

import timm
import torch
from kornia.filters import filter2d
from kornia.metrics import ssim
from torch import nn
from torch.nn import functional as F  # noqa: N812

from ._config import parse_enum
from .backbone import OFFLINE_BACKBONE
from .errors import SmaiInputError
from .pennet import to_unit_range

SSIM_WINDOW = 11
# GMS stability constant for images in [0, 1] (GMSD's 170 for [0, 255], divided by 255^2).
GMS_CONSTANT = 0.0026
MSGMS_SCALES = 4
PREWITT = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, -1.0]]) / 3


class ScoreMeasure(str, Enum):
    """How an inpainting is compared with the original.

    ``ssim``: ``1 - SSIM`` (paper, eq. 2). ``l2``: squared error (paper, eq. 3). ``msgms``:
    ``1 -`` multi-scale gradient magnitude similarity. ``features``: cosine distance of
    pretrained ImageNet features. ``memory``: distance of the original's pretrained patch
    features to the nearest features of normal training images (ignores the inpainting).
    """

    SSIM = "ssim"
    L2 = "l2"
    MSGMS = "msgms"
    FEATURES = "features"
    MEMORY = "memory"


def ssim_map(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM of two image batches in ``[-1, 1]``, averaged over channels: ``(B, 1, H, W)``."""
    return ssim(to_unit_range(first), to_unit_range(second), SSIM_WINDOW, max_val=1.0).mean(1, keepdim=True)


def gradient_magnitude(gray: torch.Tensor) -> torch.Tensor:
    """Prewitt gradient magnitude of ``(N, 1, H, W)`` images (replicated borders)."""
    kernel = PREWITT.to(gray)
    horizontal = filter2d(gray, kernel[None], border_type="replicate")
    vertical = filter2d(gray, kernel.T[None], border_type="replicate")
    return (horizontal.square() + vertical.square() + 1e-12).sqrt()


def msgms_distance(first: torch.Tensor, second: torch.Tensor, scales: int = MSGMS_SCALES) -> torch.Tensor:
    """``1 -`` multi-scale gradient magnitude similarity of two batches in ``[-1, 1]``: ``(B, 1, H, W)``.

    On the grey-level images (mean of the channels, in ``[0, 1]``) at full size and after each
    of ``scales - 1`` halvings (2x2 average pooling), GMS is
    ``(2 g1 g2 + c) / (g1^2 + g2^2 + c)`` with Prewitt gradient magnitudes ``g`` and
    ``c = 0.0026``; the maps are resized back (bilinear) and averaged. 0 means identical edges.
    ``1 - GMS`` is computed as ``(g1 - g2)^2 / (g1^2 + g2^2 + c)``, the same value without
    subtracting two numbers near 1, so that it survives bf16 inference (OpenVINO's CPU default).

    Example:
        >>> flat = torch.zeros(1, 3, 8, 8)
        >>> edge = flat.clone()
        >>> edge[..., 4:] = 1.0  # a vertical edge that ``flat`` lacks
        >>> distance = msgms_distance(edge, flat, scales=1)[0, 0]
        >>> round(float(distance[0, 0]), 4), round(float(distance[0, 4]), 4)  # far from the edge, on it
        (0.0, 0.9897)

    """
    size = first.shape[-2:]
    first, second = to_unit_range(first).mean(1, keepdim=True), to_unit_range(second).mean(1, keepdim=True)
    total = torch.zeros_like(first)
    for scale in range(scales):
        if scale:
            first, second = F.avg_pool2d(first, 2), F.avg_pool2d(second, 2)
        g1, g2 = gradient_magnitude(first), gradient_magnitude(second)
        distance = (g1 - g2).square() / (g1.square() + g2.square() + GMS_CONSTANT)
        total = total + (
            F.interpolate(distance, size=size, mode="bilinear", align_corners=False) if scale else distance
        )
    return total / scales


class PretrainedFeatures(nn.Module):
    """ImageNet features of an image batch in ``[-1, 1]``, at three levels.

    EfficientNet-Lite0 (ImageNet weights from :mod:`smai_plugin.backbone`, frozen, always in
    eval mode) at strides 4, 8 and 16 (blocks 1, 2 and 4: 24, 40 and 112 channels). The
    ``features`` measure compares their unit vectors between inpainting and original
    (:func:`feature_distance`); the ``memory`` measure describes patches of the original with the
    last two (:class:`~smai_plugin.memory.FeatureMemory`).

    The backbone's weights come from the package whenever the module is built; they are left
    out of ``state_dict`` so that checkpoints stay small and the same checkpoint loads whether
    or not a model scores with features.

    Example:
        >>> levels = PretrainedFeatures()(torch.rand(1, 3, 64, 64) * 2 - 1)
        >>> [tuple(level.shape) for level in levels]
        [(1, 24, 16, 16), (1, 40, 8, 8), (1, 112, 4, 4)]

    """

    LAYERS = (1, 2, 3)  # timm's feature_info indices of blocks 1, 2 and 4

    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            OFFLINE_BACKBONE, pretrained=True, features_only=True, out_indices=self.LAYERS
        )
        self.backbone.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.register_state_dict_post_hook(self._drop_backbone)
        self.register_load_state_dict_post_hook(self._backbone_is_not_missing)

    def train(self, mode: bool = True) -> "PretrainedFeatures":
        """Keep the backbone in eval mode (fixed batch-norm statistics) whatever ``mode`` is."""
        super().train(mode)
        self.backbone.eval()
        return self

    @staticmethod
    def _drop_backbone(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        del module, local_metadata
        for key in [key for key in state_dict if key.startswith(f"{prefix}backbone.")]:
            del state_dict[key]

    @staticmethod
    def _backbone_is_not_missing(module: nn.Module, incompatible_keys: nn.modules.module._IncompatibleKeys) -> None:
        del module
        backbone_keys = [key for key in incompatible_keys.missing_keys if ".backbone." in f".{key}"]
        for key in backbone_keys:
            incompatible_keys.missing_keys.remove(key)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Compute the feature maps ``(N, C, h, w)`` of each level for images in ``[-1, 1]``."""
        return self.backbone((to_unit_range(images) - self.mean) / self.std)


def feature_distance(first: list[torch.Tensor], second: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """``1 - cos`` of two images' features per position, resized to ``size`` and summed over levels.

    ``1 - cos`` is taken as half the squared distance of the unit vectors: no cancellation near
    1 in bf16. With three levels the map lies in ``[0, 6]``, ``(N, 1, *size)``.
    """
    total = None
    for a, b in zip(first, second, strict=True):
        level = (F.normalize(a, dim=1) - F.normalize(b, dim=1)).square().sum(1, keepdim=True) / 2
        level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        total = level if total is None else total + level
    return total


def parse_measures(
    score_measure: ScoreMeasure | str | Sequence[ScoreMeasure | str], name: str = "score_measure"
) -> tuple[ScoreMeasure, ...]:
    """Read ``score_measure``: one measure or a non-empty list of distinct ones (``name``: the setting, for errors).

    Example:
        >>> parse_measures(["msgms", "features"])
        (<ScoreMeasure.MSGMS: 'msgms'>, <ScoreMeasure.FEATURES: 'features'>)

    """
    values = [score_measure] if isinstance(score_measure, str) else list(score_measure)
    measures = tuple(parse_enum(ScoreMeasure, value, name) for value in values)
    if not measures or len(set(measures)) != len(measures):
        msg = f"{name} must be one measure or a list of distinct ones, got {score_measure!r}."
        raise SmaiInputError(msg)
    return measures


class Dissimilarity(nn.Module):
    """Per-pixel difference maps of an inpainting and its original in ``[-1, 1]``, one channel per measure.

    ``ssim``: ``1 - SSIM``; ``l2``: squared error in ``[0, 1]`` units, averaged over the colour
    channels; ``msgms``: ``1 - MSGMS``; ``features``: :func:`feature_distance` of the two
    images' :class:`PretrainedFeatures`. Every map is 0 where the two images are equal. (The
    ``memory`` measure does not compare the two: :class:`~smai_plugin.memory.FeatureMemory`.)

    Args:
        score_measure (ScoreMeasure | str | Sequence[ScoreMeasure | str]): One measure or a list.
        pretrained (PretrainedFeatures | None): The backbone of ``features``, shared with the
            model's memory where it has one; ``None`` builds one when ``features`` is measured.
            Defaults to ``None``.

    """

    def __init__(
        self,
        score_measure: ScoreMeasure | str | Sequence[ScoreMeasure | str],
        pretrained: PretrainedFeatures | None = None,
    ) -> None:
        super().__init__()
        self.measures = parse_measures(score_measure)
        if ScoreMeasure.MEMORY in self.measures:
            msg = "Dissimilarity compares an inpainting with its original; the memory measure is FeatureMemory's."
            raise SmaiInputError(msg)
        uses_features = ScoreMeasure.FEATURES in self.measures
        self.pretrained = (pretrained or PretrainedFeatures()) if uses_features else None

    def forward(self, inpainted: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """Compare ``inpainted`` with ``original``: maps ``(N, len(measures), H, W)``."""
        size = original.shape[-2:]
        maps = []
        for measure in self.measures:
            if measure == ScoreMeasure.FEATURES:  # one backbone pass for both images
                levels = self.pretrained(torch.cat([inpainted, original]))
                batch = inpainted.shape[0]  # not len(): export keeps the batch dynamic
                maps.append(feature_distance([lv[:batch] for lv in levels], [lv[batch:] for lv in levels], size))
            else:
                maps.append(self.pixel_measure(measure, inpainted, original))
        return torch.cat(maps, dim=1)

    @staticmethod
    def pixel_measure(measure: ScoreMeasure, inpainted: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """Compute the map ``(N, 1, H, W)`` of a measure that compares pixels (``ssim``, ``msgms``, ``l2``)."""
        if measure == ScoreMeasure.SSIM:
            return 1 - ssim_map(inpainted, original)
        if measure == ScoreMeasure.MSGMS:
            return msgms_distance(inpainted, original)
        return (to_unit_range(inpainted) - to_unit_range(original)).square().mean(1, keepdim=True)
