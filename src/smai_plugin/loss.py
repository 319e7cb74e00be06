"""Training losses: PEN-Net's inpainting recipe plus SMAI's SSIM objective.

Generator (:class:`SmaiLoss`), on images in ``[-1, 1]`` and hole masks with 1 in the hole:

- hole L1: ``|output - image|`` over the hole, divided by the hole's share of the image;
- valid L1: the same outside the hole;
- pyramid L1: each pyramid output against the image downsampled to its size;
- adversarial: ``-mean D(composite)`` (hinge generator loss);
- SSIM (SMAI, eq. 1): ``1 - SSIM(output, image)``, computed with kornia.

Discriminator (:func:`discriminator_hinge_loss`): PEN-Net's halved hinge loss.

Example:
    >>> loss = SmaiLoss()
    >>> images = torch.rand(2, 3, 64, 64) * 2 - 1
    >>> holes = torch.zeros(2, 1, 64, 64)
    >>> holes[..., 8:24, 8:24] = 1
    >>> pyramid = [torch.zeros(2, 3, s, s) for s in (2, 4, 8, 16, 32)]
    >>> terms = loss(images, holes, images, pyramid, fake_scores=torch.zeros(2, 1, 4, 4))
    >>> float(terms["hole_l1"]), float(terms["ssim"])  # a perfect inpainting
    (0.0, 0.0)

"""

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .errors import SmaiInputError
from .similarity import ssim_map


class SmaiLoss(nn.Module):
    """Weighted generator loss.

    Args:
        hole_weight (float): Weight of the L1 loss inside the hole. Defaults to ``6.0``.
        valid_weight (float): Weight of the L1 loss outside the hole. Defaults to ``1.0``.
        pyramid_weight (float): Weight of the pyramid L1 loss. Defaults to ``0.5``.
        adversarial_weight (float): Weight of the adversarial loss. Defaults to ``0.1``.
        ssim_weight (float): Weight of SMAI's ``1 - SSIM`` loss. Defaults to ``1.0``.

    """

    def __init__(
        self,
        hole_weight: float = 6.0,
        valid_weight: float = 1.0,
        pyramid_weight: float = 0.5,
        adversarial_weight: float = 0.1,
        ssim_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.weights = {
            "hole_l1": hole_weight,
            "valid_l1": valid_weight,
            "pyramid_l1": pyramid_weight,
            "adversarial": adversarial_weight,
            "ssim": ssim_weight,
        }
        negative = {name: weight for name, weight in self.weights.items() if weight < 0}
        if negative:
            msg = f"Loss weights must be non-negative, got {negative}."
            raise SmaiInputError(msg)

    def forward(
        self,
        images: torch.Tensor,
        holes: torch.Tensor,
        output: torch.Tensor,
        pyramid: list[torch.Tensor],
        fake_scores: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Compute every loss term and their weighted sum (key ``"loss"``).

        Args:
            images (torch.Tensor): Originals in ``[-1, 1]``, ``(B, 3, H, W)``.
            holes (torch.Tensor): Hole masks ``(B, 1, H, W)``.
            output (torch.Tensor): Generator output ``(B, 3, H, W)``.
            pyramid (list[torch.Tensor]): Generator pyramid outputs.
            fake_scores (torch.Tensor): Discriminator scores of the composite.

        Returns:
            dict[str, torch.Tensor]: Unweighted terms and the weighted total ``"loss"``.

        """
        error = (output - images).abs()
        terms = {
            "hole_l1": (error * holes).mean() / holes.mean().clamp(min=1e-8),
            "valid_l1": (error * (1 - holes)).mean() / (1 - holes).mean().clamp(min=1e-8),
            "pyramid_l1": sum(
                F.l1_loss(level, F.interpolate(images, size=level.shape[-2:], mode="area")) for level in pyramid
            ),
            "adversarial": -fake_scores.mean(),
            "ssim": 1 - ssim_map(output, images).mean(),
        }
        terms["loss"] = sum(self.weights[name] * value for name, value in terms.items())
        return terms


def discriminator_hinge_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """PEN-Net's discriminator loss: ``(mean relu(1 - D(real)) + mean relu(1 + D(fake))) / 2``."""
    return (F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()) / 2
