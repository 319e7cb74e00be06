"""SMAI's pass schedule: which superpixels each inpainting pass masks, and what it inpaints.

The paper scores each superpixel in a pass of its own (``leave_one_out``). ``grouped`` masks
superpixels that cannot touch together, so a handful of passes cover the image. ``windowed``
keeps one superpixel per pass but inpaints only a crop around it: :func:`window_index` and
:func:`crop_passes` cut those crops, for scoring and for training alike (a windowed model trains
on exactly the crops it scores). Everything here depends on shapes only, so the schedule is a
constant of the exported graph.

Example:
    >>> superpixels = torch.zeros(1, 77, 256, 256)
    >>> pass_holes(superpixels, ScoringMode.GROUPED).shape  # 9 passes instead of 77
    torch.Size([1, 9, 256, 256])

"""

from enum import Enum

import torch

from .superpixel import superpixel_grid


class ScoringMode(str, Enum):
    """Which superpixels are masked together in one inpainting pass at inference.

    ``leave_one_out``: the paper's schedule, one superpixel per pass (``n_superpixels`` passes,
    fewer where SLIC's grid of centres has fewer cells).
    ``grouped``: superpixels whose grid cells are at least ``GROUP_STRIDE`` cells apart in a row
    or column share a pass, so no two neighbours are masked together; about one in nine
    superpixels is masked per pass (roughly what training masks), so 9 passes replace 77.
    ``windowed``: leave-one-out, but each pass inpaints only a ``window_size`` crop centred on
    its superpixel (64x64 of a 256x256 image: 1/16 of the convolutions, 1/256 of the attention).
    """

    LEAVE_ONE_OUT = "leave_one_out"
    GROUPED = "grouped"
    WINDOWED = "windowed"


GROUP_STRIDE = 3


def superpixel_groups(n_superpixels: int, height: int, width: int, stride: int = GROUP_STRIDE) -> torch.Tensor:
    """Assign each superpixel to a pass so that neighbouring superpixels never share one.

    Superpixel ``k`` grows from grid cell ``(k // cols, k % cols)`` and only takes pixels of
    the neighbouring cells, so superpixels whose cells are ``stride >= 3`` apart cannot touch.
    Cells are grouped by ``(row % stride, col % stride)``; empty groups are dropped.

    Args:
        n_superpixels (int): Masks per image (``K``).
        height (int): Image height.
        width (int): Image width.
        stride (int): Cell distance between superpixels of one group. Defaults to ``3``.

    Returns:
        torch.Tensor: ``(K, G)`` one-hot assignment of superpixels to ``G`` passes (masks past
        the grid, always empty, go to the first pass).

    Example:
        >>> superpixel_groups(77, 256, 256).shape  # an 8 x 9 grid in 9 groups
        torch.Size([77, 9])

    """
    rows, cols = superpixel_grid(n_superpixels, height, width)
    # Plain Python: the schedule depends on shapes only, so export sees a constant.
    group = [(k // cols % stride) * stride + k % cols % stride if k < rows * cols else 0 for k in range(n_superpixels)]
    used = sorted(set(group))
    return torch.tensor([[float(g == u) for u in used] for g in group])


def pass_holes(superpixels: torch.Tensor, scoring: ScoringMode) -> torch.Tensor:
    """Hole mask of every inference pass, ``(B, passes, H, W)``: the superpixels, or their groups.

    Masks past the ``rows x cols`` grid of SLIC's centres are always empty (40 superpixels at
    128x128 make a 6 x 6 grid), so they get no pass: an empty pass would inpaint a crop, or a
    whole image, that adds nothing to the map.

    Args:
        superpixels (torch.Tensor): Superpixel masks ``(B, K, H, W)``.
        scoring (ScoringMode): The schedule; only ``grouped`` merges superpixels into passes.

    Returns:
        torch.Tensor: One hole mask per pass.

    Example:
        >>> pass_holes(torch.zeros(1, 40, 128, 128), ScoringMode.WINDOWED).shape  # 36 superpixels
        torch.Size([1, 36, 128, 128])

    """
    if scoring != ScoringMode.GROUPED:
        rows, cols = superpixel_grid(superpixels.shape[1], *superpixels.shape[-2:])
        return superpixels[:, : rows * cols]
    groups = superpixel_groups(superpixels.shape[1], *superpixels.shape[-2:]).to(superpixels)
    return torch.einsum("bkhw,kg->bghw", superpixels, groups)


def window_index(holes: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Flat pixel indices of the crop of each pass: ``window`` centred on the hole's bounding box.

    The crop is moved inside the image where the centre is too close to a border; an empty
    hole gets the central crop. A window the size of the image gives every pixel in order.

    Args:
        holes (torch.Tensor): Hole masks ``(B, P, H, W)``.
        window (tuple[int, int]): Crop ``(h, w)``, at most ``(H, W)``.

    Returns:
        torch.Tensor: Indices into the flattened image, ``(B, P, h * w)``, row-major in the crop.

    Example:
        >>> holes = torch.zeros(1, 1, 8, 8)
        >>> holes[0, 0, 6:8, 0:2] = 1  # a hole in the bottom-left corner
        >>> window_index(holes, (4, 4)).reshape(4, 4)[0].tolist()  # crop rows 4..7, columns 0..3
        [32, 33, 34, 35]

    """
    height, width = holes.shape[-2:]
    starts = []
    for axis, size, side in ((3, height, window[0]), (2, width, window[1])):
        present = holes.amax(dim=axis) > 0  # (B, P, size): rows (axis 3) or columns (axis 2) the hole touches
        coords = torch.arange(size, device=holes.device)
        first = torch.where(present, coords, size).amin(-1)
        last = torch.where(present, coords, -1).amax(-1)
        start = torch.div(first + last + 1 - side, 2, rounding_mode="floor")  # empty hole: centred crop
        starts.append(start.clamp(0, size - side))
    rows = starts[0][..., None] + torch.arange(window[0], device=holes.device)  # (B, P, h)
    cols = starts[1][..., None] + torch.arange(window[1], device=holes.device)  # (B, P, w)
    return (rows[..., :, None] * width + cols[..., None, :]).flatten(2)


def crop_passes(
    images: torch.Tensor,
    holes: torch.Tensor,
    window: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut every pass's crop (see :func:`window_index`) out of its image and hole mask.

    Args:
        images (torch.Tensor): Images ``(B, C, H, W)``.
        holes (torch.Tensor): Hole masks ``(B, P, H, W)``, ``P`` passes per image.
        window (tuple[int, int]): Crop ``(h, w)``.

    Returns:
        tuple[torch.Tensor, torch.Tensor, torch.Tensor]: Image crops ``(B * P, C, h, w)`` and hole
        crops ``(B * P, 1, h, w)``, pass-major within each image, and the crops' flat pixel
        indices ``(B, P, h * w)`` (to add results back with ``scatter_add``).

    """
    batch, n_passes = holes.shape[:2]
    channels = images.shape[1]
    index = window_index(holes, window)
    masks = holes.flatten(2).gather(2, index).reshape(batch * n_passes, 1, *window)
    crops = images.flatten(2).gather(2, index.flatten(1)[:, None, :].expand(-1, channels, -1))
    crops = crops.reshape(batch, channels, n_passes, *window).transpose(1, 2).reshape(-1, channels, *window)
    return crops, masks, index
