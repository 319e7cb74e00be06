"""SLIC superpixels in torch, with a fixed number of segments per image.

SMAI masks superpixels, so holes follow image structure. scikit-image's ``slic`` is the
reference, but it runs on numpy one image at a time and returns a data-dependent number of
segments, which export cannot trace. :class:`SuperpixelMasker` runs SLIC batched in torch:

1. centres start on a regular ``rows x cols`` grid (``rows * cols <= n_superpixels``);
2. each iteration assigns every pixel to the closest of the 9 centres whose grid cells
   neighbour the pixel's cell (colour distance in CIELAB plus a compactness-weighted spatial
   distance, as in SLIC), then moves every centre to the mean of its pixels.

The output always has ``n_superpixels`` masks; masks past ``rows * cols`` (and any centre that
lost all its pixels) are empty.

SLIC of an image never changes, while training draws new holes in the same images every epoch:
:class:`SuperpixelCache` keeps the labels of the images it has segmented, keyed by their content.

Example:
    >>> import torch
    >>> masker = SuperpixelMasker(n_superpixels=77)
    >>> masks = masker(torch.rand(2, 3, 256, 256))
    >>> masks.shape
    torch.Size([2, 77, 256, 256])
    >>> bool((masks.sum(1) == 1).all())  # every pixel belongs to exactly one superpixel
    True

"""

import hashlib
import math

import torch
from kornia.color import rgb_to_lab
from torch import nn
from torch._higher_order_ops.scan import scan  # torch's loop for export, still under a private name

from ._config import check_int
from .errors import SmaiInputError


def superpixel_grid(n_superpixels: int, height: int, width: int) -> tuple[int, int]:
    """Choose the ``rows x cols`` grid of initial centres.

    The grid follows the image's aspect ratio and never has more cells than
    ``n_superpixels``.

    Args:
        n_superpixels (int): Number of masks the masker returns.
        height (int): Image height in pixels.
        width (int): Image width in pixels.

    Returns:
        tuple[int, int]: Grid rows and columns.

    Example:
        >>> superpixel_grid(77, 256, 256)
        (8, 9)

    """
    rows = max(1, min(height, math.floor(math.sqrt(n_superpixels * height / width))))
    cols = max(1, min(width, n_superpixels // rows))
    return rows, cols


def one_hot_labels(labels: torch.Tensor, classes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One-hot encode ``(B, *S)`` labels along a new axis 1, ``(B, len(classes), *S)``.

    A comparison, which every exporter has, and laid out classes first, as both callers use it (a
    transpose after it cost SLIC's exported loop a tenth of its time). ``classes`` is a tensor, not
    a count, so that SLIC's loop in an export can take it in as state.
    """
    return (labels[:, None] == classes.reshape(-1, *[1] * (labels.dim() - 1))).to(dtype)


def nearest_candidate(distance: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Pick each pixel's candidate at the smallest distance, the first of equals, as ``argmin`` does.

    A running minimum over the candidates, ``(B, N, P)`` distances to ``candidates`` ``(N, P)``
    giving ``(B, P)``: elementwise steps along the pixels, which OpenVINO fuses into one kernel,
    where an argmin across the candidates needs a transpose, a ``TopK`` and a gather (exported
    SLIC: 13 -> 9 ms at 128x128, docs/deploy.md).

    Example:
        >>> distance = torch.tensor([[[3.0, 1.0], [2.0, 1.0], [2.0, 0.5]]])
        >>> nearest_candidate(distance, torch.tensor([[10, 11], [20, 21], [30, 31]]))
        tensor([[20, 31]])

    """
    nearest, labels = distance[:, 0], candidates[0].expand_as(distance[:, 0])
    for rank in range(1, distance.shape[1]):
        closer = distance[:, rank] < nearest
        nearest = torch.where(closer, distance[:, rank], nearest)
        labels = torch.where(closer, candidates[rank], labels)
    return labels


def gather_candidates(centres: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Pick the centres ``(B, F, K)`` at ``candidates`` ``(N,)``, ``(B, F, N)``, by the op each runtime runs fastest.

    In an export, ``index_select`` along the last axis: one OpenVINO ``Gather``, where indexing
    adds a transpose and ``gather`` becomes a ``GatherElements``, 1.5-2x slower each. In torch,
    ``gather`` with an expanded index: 0.4 ms for SLIC's 9 x 16384 candidates, where
    ``index_select`` along the last axis takes 5 ms. The same values either way.
    """
    if torch.compiler.is_exporting():
        return centres.index_select(2, candidates)
    return torch.gather(centres, 2, candidates.expand(*centres.shape[:2], -1))


class SuperpixelMasker(nn.Module):
    """Batched SLIC returning ``n_superpixels`` binary masks per image.

    Args:
        n_superpixels (int): Number of masks per image (the paper's m). Defaults to ``77``.
        compactness (float): Weight of spatial against colour distance, as in
            ``skimage.segmentation.slic``. Defaults to ``10.0``.
        slic_iterations (int): SLIC iterations. Defaults to ``10``.

    Example:
        >>> masker = SuperpixelMasker(n_superpixels=16, slic_iterations=5)
        >>> masker.labels(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 64, 64])

    """

    def __init__(self, n_superpixels: int = 77, compactness: float = 10.0, slic_iterations: int = 10) -> None:
        super().__init__()
        check_int(n_superpixels, "n_superpixels")
        if compactness <= 0:
            msg = f"compactness must be positive, got {compactness}."
            raise SmaiInputError(msg)
        check_int(slic_iterations, "slic_iterations")
        self.n_superpixels = n_superpixels
        self.compactness = compactness
        self.slic_iterations = slic_iterations

    def check_size(self, height: int, width: int) -> None:
        """Refuse images with fewer pixels than superpixels.

        Raises:
            ValueError: If ``n_superpixels`` exceeds ``height * width``.

        """
        if self.n_superpixels > height * width:
            msg = (
                f"n_superpixels ({self.n_superpixels}) exceeds the {height * width} pixels of {height}x{width} "
                "images: lower n_superpixels or raise image_size."
            )
            raise SmaiInputError(msg)

    def labels(self, images: torch.Tensor) -> torch.Tensor:
        """Segment images into superpixels.

        Args:
            images (torch.Tensor): RGB images in ``[0, 1]``, shape ``(B, 3, H, W)``.

        Returns:
            torch.Tensor: Superpixel index of every pixel, shape ``(B, H, W)``, values in
            ``[0, rows * cols)``.

        """
        batch, _, height, width = images.shape
        self.check_size(height, width)  # shapes only: export sees a constant
        rows, cols = superpixel_grid(self.n_superpixels, height, width)
        step = math.sqrt(height * width / (rows * cols))
        # Spatial coordinates are divided by the grid step and scaled by the compactness, so a
        # plain squared distance over (L, a, b, y, x) is SLIC's distance.
        spatial_scale = self.compactness / step

        ys = torch.arange(height, device=images.device, dtype=images.dtype)
        xs = torch.arange(width, device=images.device, dtype=images.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        position = torch.stack([grid_y, grid_x]) * spatial_scale  # (2, H, W)
        features = torch.cat([rgb_to_lab(images), position.expand(batch, -1, -1, -1)], dim=1)
        features = features.flatten(2).transpose(1, 2)  # (B, HW, 5)

        # Each pixel's grid cell: the initial superpixels.
        cell_row = (ys * rows / height).long().clamp(max=rows - 1)
        cell_col = (xs * cols / width).long().clamp(max=cols - 1)
        cell = (cell_row[:, None] * cols + cell_col[None, :]).flatten()  # (HW,)

        # Candidate centres of each pixel: the 3x3 neighbourhood of its grid cell.
        offsets = torch.tensor([-1, 0, 1], device=images.device)
        neighbour_row = cell_row[:, None] + offsets[None, :]  # (H, 3)
        neighbour_col = cell_col[:, None] + offsets[None, :]  # (W, 3)
        row_ok = (neighbour_row >= 0) & (neighbour_row < rows)
        col_ok = (neighbour_col >= 0) & (neighbour_col < cols)
        candidates = (
            neighbour_row.clamp(0, rows - 1)[:, None, :, None] * cols
            + neighbour_col.clamp(0, cols - 1)[None, :, None, :]
        )  # (H, W, 3, 3)
        valid = row_ok[:, None, :, None] & col_ok[None, :, None, :]
        candidates = candidates.reshape(height * width, 9)
        invalid_penalty = (~valid).reshape(height * width, 9).T.to(images.dtype) * 1e10  # (9, HW)
        grid = (cell, candidates, invalid_penalty, torch.arange(rows * cols, device=images.device))

        if torch.compiler.is_exporting():
            # One image at a time, in a loop of the exported graph (ONNX Scan). With anomalib's
            # dynamic batch OpenVINO runs SLIC's elementwise operations unfused, one by one; in the
            # loop's body their shapes are fixed and it fuses them: SLIC twice as fast, the same
            # labels but for float near-ties (docs/deploy.md). The grid tensors travel as the loop's
            # state: created inside its body they would not export.
            def one_image(state: list[torch.Tensor], image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
                return [tensor.clone() for tensor in state], self._iterate(image[None], *state)[0]

            labels = scan(one_image, list(grid), features)[1]
        else:
            labels = self._iterate(features, *grid)
        return labels.reshape(batch, height, width)

    def _iterate(
        self,
        features: torch.Tensor,
        cell: torch.Tensor,
        candidates: torch.Tensor,
        invalid_penalty: torch.Tensor,
        centre_ids: torch.Tensor,
    ) -> torch.Tensor:
        """SLIC's iterations from the grid's cells: labels ``(B, HW)`` of pixel features ``(B, HW, 5)``.

        ``cell`` ``(HW,)`` is each pixel's grid cell, ``candidates`` ``(HW, 9)`` the centres it
        may join, ``invalid_penalty`` ``(9, HW)`` rules out candidates past the grid's edge and
        ``centre_ids`` numbers the centres.
        """
        batch = features.shape[0]
        centres = self._update_centres(features, cell.expand(batch, -1), centre_ids, None)
        # The distances are computed channels first, pixels last, (B, 5, 9, HW): OpenVINO vectorises
        # along the last axis, where a last axis of 5 made SLIC twice as slow. Same labels either way.
        pixels = features.transpose(1, 2)[:, :, None, :]  # (B, 5, 1, HW)
        candidates_by_rank = candidates.T  # (9, HW)
        flat_candidates = candidates_by_rank.flatten()
        labels = cell.expand(batch, -1)
        for _ in range(self.slic_iterations):
            candidate_centres = gather_candidates(centres.transpose(1, 2), flat_candidates).unflatten(2, (9, -1))
            distance = (pixels - candidate_centres).pow(2).sum(1) + invalid_penalty  # (B, 9, HW)
            labels = nearest_candidate(distance, candidates_by_rank)
            centres = self._update_centres(features, labels, centre_ids, centres)
        return labels

    @staticmethod
    def _update_centres(
        features: torch.Tensor,
        labels: torch.Tensor,
        centre_ids: torch.Tensor,
        previous: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mean feature per label; a centre with no pixels keeps its previous position.

        Sums and pixel counts come from one matrix product with the one-hot labels: a matrix
        product accumulates in float32 under bf16 inference (OpenVINO's CPU default), where a
        scatter-add would count in bf16, which stops at 256.
        """
        with_ones = torch.cat([features, torch.ones_like(features[..., :1])], dim=2)  # (B, HW, F + 1)
        totals = one_hot_labels(labels, centre_ids, features.dtype) @ with_ones  # (B, K, F + 1)
        sums, counts = totals[..., :-1], totals[..., -1:]
        means = sums / counts.clamp(min=1)
        return means if previous is None else torch.where(counts > 0, means, previous)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return one binary mask per superpixel.

        Args:
            images (torch.Tensor): RGB images in ``[0, 1]``, shape ``(B, 3, H, W)``.

        Returns:
            torch.Tensor: Masks of shape ``(B, n_superpixels, H, W)`` with 1 inside the
            superpixel; they partition the image, and some may be empty.

        """
        return self.masks(self.labels(images), images.dtype)

    def masks(self, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Turn labels ``(B, H, W)`` into ``n_superpixels`` binary masks ``(B, n_superpixels, H, W)``."""
        return one_hot_labels(labels, torch.arange(self.n_superpixels, device=labels.device), dtype)


class SuperpixelCache:
    """A :class:`SuperpixelMasker` that remembers the labels of the images it has segmented.

    Training masks random superpixels of the same images every epoch, and SLIC is a large share
    of a CPU training iteration (keeping the labels took the bottle CPU preset's training from 761
    to 615 s); the labels of an image depend only on its pixels and the masker's settings, so
    they are kept, keyed by a hash of both.
    Images seen for the first time (all of them, with random augmentations) are segmented as
    before. Labels are kept on the CPU, as the smallest integer type that holds them, until
    ``max_bytes`` are used; images past that are segmented every time.

    Args:
        masker (SuperpixelMasker): The masker whose labels are kept.
        max_bytes (int): Most bytes of labels kept. Defaults to 256 MiB (4096 images of 256x256).

    Example:
        >>> cache = SuperpixelCache(SuperpixelMasker(n_superpixels=16, slic_iterations=5))
        >>> images = torch.rand(2, 3, 64, 64)
        >>> bool((cache(images) == cache.masker(images)).all()), len(cache)
        (True, 2)

    """

    def __init__(self, masker: SuperpixelMasker, max_bytes: int = 256 * 2**20) -> None:
        self.masker = masker
        self.max_bytes = max_bytes
        self._labels: dict[bytes, torch.Tensor] = {}
        self._bytes = 0

    def __len__(self) -> int:
        """Count the images whose labels are kept."""
        return len(self._labels)

    def _key(self, image: torch.Tensor) -> bytes:
        settings = (self.masker.n_superpixels, self.masker.compactness, self.masker.slic_iterations, tuple(image.shape))
        digest = hashlib.blake2b(repr(settings).encode(), digest_size=16)
        digest.update(image.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
        return digest.digest()

    def labels(self, images: torch.Tensor) -> torch.Tensor:
        """Return the masker's labels ``(B, H, W)`` of ``images`` ``(B, 3, H, W)``, segmenting only new images."""
        keys = [self._key(image) for image in images]
        new = [index for index, key in enumerate(keys) if key not in self._labels]
        computed = dict(zip(new, self.masker.labels(images[new]), strict=True)) if new else {}
        for index, labels in computed.items():
            kept = labels.to("cpu", torch.uint8 if self.masker.n_superpixels <= 256 else torch.int32)
            if self._bytes + kept.nbytes <= self.max_bytes:
                self._labels[keys[index]] = kept
                self._bytes += kept.nbytes
        return torch.stack(
            [
                computed[index] if index in computed else self._labels[key].to(images.device, torch.long)
                for index, key in enumerate(keys)
            ]
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Masks ``(B, n_superpixels, H, W)``, as :meth:`SuperpixelMasker.forward` returns them."""
        return self.masker.masks(self.labels(images), images.dtype)
