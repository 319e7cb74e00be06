"""PEN-Net (Zeng et al., CVPR 2019): pyramid-context encoder network for inpainting.

Written from the architecture description (no code taken from the public implementation).
Sizes for a 256x256 input and base width ``c``:

- encoder: six stride-2 3x3 convolutions, 4 -> c -> 2c -> 4c -> 8c -> 16c -> 16c channels;
- attention transfer cascade from deep to shallow (levels 5..1), see :mod:`.attention`;
- decoder: bilinear x2 upsampling + 3x3 convolution per level, with 1x1 ``tanh`` pyramid
  outputs at 8, 16, 32, 64 and 128 pixels, and a final two-convolution head at full size;
- discriminator: spectral-norm 5x5 patch discriminator on the composited image.

Images are in ``[-1, 1]`` (:func:`to_signed` and :func:`to_unit_range` convert from and to
anomalib's ``[0, 1]``); masks have 1 in the hole. The generator sees the masked image
(holes filled with +1) and the mask as a fourth channel.

Example:
    >>> generator = PenNetGenerator(base_channels=8)
    >>> images, masks = torch.rand(2, 3, 64, 64) * 2 - 1, torch.zeros(2, 1, 64, 64)
    >>> output, pyramid = generator(images, masks)
    >>> output.shape, [p.shape[-1] for p in pyramid]
    (torch.Size([2, 3, 64, 64]), [2, 4, 8, 16, 32])

"""

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.nn.utils import spectral_norm

from ._config import check_int
from .attention import AttentionTransfer
from .errors import SmaiInputError

N_LEVELS = 6


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """Map images from ``[0, 1]`` (anomalib's pre-processor output) to PEN-Net's ``[-1, 1]``."""
    return images * 2 - 1


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map images from PEN-Net's ``[-1, 1]`` back to ``[0, 1]``."""
    return (images + 1) / 2


def composite(images: torch.Tensor, inpainted: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    """Paste the inpainting into the images' holes (``holes``: 1 in the hole).

    Example:
        >>> composite(torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2), torch.tensor([[[[0.0, 1.0]]]]))
        tensor([[[[0., 1.]]]])

    """
    return images * (1 - holes) + inpainted * holes


def init_weights(module: nn.Module) -> None:
    """He-normal weights and zero biases for every convolution.

    PEN-Net initialises with normal(0, 0.02), which suits its width (c = 32) poorly enough and
    narrower networks not at all: at c = 8 the untrained output has a standard deviation of
    4e-6 and gradients vanish. He initialisation keeps activations at scale for any width.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, a=0.2, nonlinearity="leaky_relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


def _conv_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU())


class PenNetGenerator(nn.Module):
    """PEN-Net generator: encoder, ATN cascade, decoder with pyramid outputs.

    Args:
        base_channels (int): Width ``c`` of the first encoder level. Defaults to ``32``
            (PEN-Net's, about 10.2 M parameters).
        local_attention (bool): Attention only from positions near the hole (see
            :mod:`.attention`); ``False`` is PEN-Net's full attention. Defaults to ``False``.

    Raises:
        ValueError: If ``base_channels`` is not a positive multiple of 4 (the fusion splits
            channels in four).

    """

    def __init__(self, base_channels: int = 32, local_attention: bool = False) -> None:
        super().__init__()
        check_int(base_channels, "base_channels", minimum=4, multiple_of=4)
        c = base_channels
        widths = [c, 2 * c, 4 * c, 8 * c, 16 * c, 16 * c]
        in_widths = [4, *widths[:-1]]
        self.encoder = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.LeakyReLU(0.2) if i < 5 else nn.ReLU())
            for i, (cin, cout) in enumerate(zip(in_widths, widths, strict=True))
        )
        # attention[i] fills encoder level i+1 (x1..x5) from level i+2.
        self.attention = nn.ModuleList(
            AttentionTransfer(widths[i], patch_size=3 if i < 4 else 1, fuse=i < 4, local=local_attention)
            for i in range(5)
        )
        # decoder[0] makes u5 from x6; decoder[i] makes u(5-i) from [u(6-i), x(6-i)'].
        self.decoder = nn.ModuleList(
            [
                _conv_relu(16 * c, 16 * c),
                _conv_relu(32 * c, 8 * c),
                _conv_relu(16 * c, 4 * c),
                _conv_relu(8 * c, 2 * c),
                _conv_relu(4 * c, c),
            ]
        )
        self.pyramid = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, 3, 1), nn.Tanh()) for channels in (32 * c, 16 * c, 8 * c, 4 * c, 2 * c)
        )
        self.head = nn.Sequential(_conv_relu(2 * c, c), nn.Conv2d(c, 3, 3, padding=1), nn.Tanh())
        init_weights(self)

    def set_query_budget(self, budget: float) -> None:
        """Share of query positions the local attention computes at the two shallowest levels.

        Those levels hold about 95% of the attention's cost; deeper maps are small, and there
        the near-hole region is a large share of the map anyway.
        """
        if not 0 < budget <= 1:
            msg = f"The attention budget must be in (0, 1], got {budget}."
            raise SmaiInputError(msg)
        for level in self.attention[:2]:
            level.query_budget = budget

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Inpaint the holes of ``images``.

        Args:
            images (torch.Tensor): Images in ``[-1, 1]``, ``(B, 3, H, W)``; ``H`` and ``W``
                must be multiples of 64.
            masks (torch.Tensor): Hole masks ``(B, 1, H, W)``, 1 in the hole.

        Returns:
            tuple[torch.Tensor, list[torch.Tensor]]: The inpainted image ``(B, 3, H, W)`` in
            ``[-1, 1]`` and the five pyramid outputs, coarse to fine (``H/32`` .. ``H/2``).

        """
        # Channels-last: oneDNN's convolutions and bilinear upsampling run several times faster
        # on CPU in that layout (upsampling ~7x on small maps); results are the same.
        x = torch.cat([images * (1 - masks) + masks, masks], dim=1).contiguous(memory_format=torch.channels_last)
        features = []
        for layer in self.encoder:
            x = layer(x)
            features.append(x)
        # Attention cascade, deep to shallow: x5' = ATN(x5, x6), x4' = ATN(x4, x5'), ...
        filled = features[-1]
        attended = []
        for level in reversed(range(5)):
            filled = self.attention[level](features[level], filled, masks)
            attended.insert(0, filled)

        decoded = self.decoder[0](_up(features[-1]))
        pyramid = []
        for level in reversed(range(5)):
            skip = torch.cat([decoded, attended[level]], dim=1).contiguous(memory_format=torch.channels_last)
            pyramid.append(self.pyramid[4 - level](skip))
            decoded = self.decoder[5 - level](_up(skip)) if level > 0 else self.head(_up(skip))
        return decoded, pyramid


class PenNetDiscriminator(nn.Module):
    """PEN-Net's spectral-norm patch discriminator.

    Args:
        base_channels (int): Width of the first layer. Defaults to ``64`` (PEN-Net's).

    Example:
        >>> discriminator = PenNetDiscriminator(base_channels=16)
        >>> discriminator(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 1, 3, 3])

    """

    def __init__(self, base_channels: int = 64) -> None:
        super().__init__()
        check_int(base_channels, "discriminator_channels")
        c = base_channels
        layers: list[nn.Module] = []
        for cin, cout, stride in ((3, c, 2), (c, 2 * c, 2), (2 * c, 4 * c, 2), (4 * c, 8 * c, 1)):
            layers += [spectral_norm(nn.Conv2d(cin, cout, 5, stride=stride, padding=1, bias=False)), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(8 * c, 1, 5, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Score patches of ``images`` (higher: more real)."""
        return self.layers(images)
