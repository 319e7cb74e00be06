"""A memory of normal patch features: how far each part of an image is from everything normal.

SMAI's inpainting residual finds what the inpainter cannot restore from the context, but an
inpainter trained for minutes on a CPU also restores normal detail imperfectly, and a small defect
that it happens to restore well scores nothing. :class:`FeatureMemory` adds an opinion of its own,
the way PatchCore scores: every patch of the image is described by pretrained ImageNet features and
compared with a memory of the patches of the normal training images; its distance to the nearest
normal patch is its value. It looks at the original image only, never at the inpainting.

A patch's description (:meth:`FeatureMemory.embed`) joins two scales: PatchCore's *locally
aware* feature, EfficientNet-Lite0's blocks 2 and 4 (strides 8 and 16, 40 and 112 channels) each
averaged over a 3x3 window of positions (so a patch also knows its surroundings), and the same
two levels as they are (the patch's own detail, which the average dilutes: a thin crack, fine
grain). The coarser level is resized to the finer level's grid: one 304-value vector per 8x8
pixels (``neighbourhood=(3, 1)``; one window, e.g. ``3``, gives PatchCore's 152 values alone).

Each position's distance is then the largest within its ``dilation`` x ``dilation`` window of
positions: a defect reaches the patches around it only faintly (their windows hold a little of
it), so the map is dilated to its full extent (docs/quality.md measures both).

Distances are Euclidean, in the features' own space or in a *whitened* one (``whitening``): the
patch vectors centred on their normal mean and multiplied by the inverse square root of their
normal covariance, fitted on all training patches together (one distribution for every
position). A direction in which normal patches hardly vary then counts as much as one in which
they vary a lot (PaDiM's Mahalanobis distance, here to the nearest normal patch instead of a
per-position mean). The covariance is shrunk towards a multiple of the identity (``SHRINKAGE`` of
its mean eigenvalue), so that directions with almost no normal variance do not turn noise into
distance. Whitening helps where one distribution describes every position, as on a texture, and
hurts where the position decides what a patch should be, as on an aligned object (docs/quality.md).
By default (``whitening=None``) the memory chooses from the training images: it whitens when
less than ``POSITION_SHARE`` of the patch vectors' variance lies between positions (the variance
of the per-position mean over the total variance, :func:`position_share`).

The memory is fitted before the calibration, on the same training images. It keeps at most
``size`` of their patch vectors: a greedy *coreset* (each next vector the one farthest from those
already kept, so that rare normal patches stay covered; PatchCore's k-center selection) or a seeded
random sample. When the calibration scores those training images, each image's own vectors are
left out of the memory (``leave_out``): otherwise its patches would find themselves and its normal
maps would be 0.

The memory is a buffer: it travels in checkpoints and is a constant of the exported graph.

Example:
    >>> memory = FeatureMemory(size=20)
    >>> normal = [[torch.rand(2, 40, 8, 8), torch.rand(2, 112, 4, 4)] for _ in range(3)]
    >>> memory.fit(memory.embed(levels) for levels in normal)
    >>> memory.bank.shape  # 152 values per window: the 3x3 average and the patch itself
    torch.Size([20, 304])
    >>> memory(memory.embed(normal[0]), size=(64, 64)).shape
    torch.Size([2, 1, 64, 64])

"""

from collections.abc import Iterable, Sequence
from enum import Enum

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from ._config import check_int, check_odd, parse_enum
from .calibration import allow_missing, resize_to_saved
from .errors import SmaiInputError

# Distances of one chunk of query positions to the whole memory stay under this many values per
# image (16 MB in float32); the chunking depends on the image size and the memory only, so it
# exports as a fixed loop.
CHUNK_VALUES = 2**22
SEED = 0
# The whitened covariance is the normal one plus this fraction of its mean eigenvalue on the diagonal.
SHRINKAGE = 0.01
# With ``whitening=None`` the memory whitens when less of its patches' variance lies between positions.
POSITION_SHARE = 0.65
# The nearest memory vector is searched in groups of this many (:func:`first_argmin`).
ARGMIN_GROUP = 64


class MemorySampling(str, Enum):
    """How the memory picks the patch vectors it keeps: ``coreset`` (greedy k-center) or ``random``."""

    CORESET = "coreset"
    RANDOM = "random"


def first_argmin(values: torch.Tensor, group: int = ARGMIN_GROUP) -> torch.Tensor:
    """Index of the first smallest value along the last axis, as ``values.argmin(-1)``, found in two steps.

    The smallest value of each ``group`` of consecutive values first (a reduction), then the first
    group holding the overall smallest, then the first smallest within that group. OpenVINO runs an
    argmin as a ``TopK``; over the memory's 4096 vectors for 1024 positions the two steps took half
    of its time (docs/deploy.md). Ties resolve as in ``argmin``: the first index.

    Example:
        >>> values = torch.tensor([[5.0, 3.0, 7.0, 3.0, 9.0], [1.0, 2.0, 0.0, 4.0, 0.0]])
        >>> first_argmin(values, group=2).tolist()
        [1, 2]

    """
    length = values.shape[-1]
    if length % group:  # pad with values never chosen over a real one
        values = F.pad(values, (0, group - length % group), value=float("inf"))
    grouped = values.unflatten(-1, (-1, group))  # (..., groups, group)
    best_group = grouped.amin(-1).argmin(-1, keepdim=True)  # (..., 1)
    within = torch.gather(grouped, -2, best_group[..., None].expand(*grouped.shape[:-2], 1, group)).squeeze(-2)
    return best_group.squeeze(-1) * group + within.argmin(-1)


def position_share(vectors: torch.Tensor) -> float:
    """Share of the patch vectors' variance that lies between positions: 1 when the position decides a patch.

    The variance of the per-position mean vectors over the positions, against the variance of all
    vectors, each summed over the channels: near 0 for a texture (every position alike), near 1 for
    aligned parts whose every position always looks the same. 1 also for vectors that do not vary
    at all (blank images): there is nothing to whiten.

    Args:
        vectors (torch.Tensor): The patch vectors of every image at every position, ``(images, positions, C)``.

    Example:
        >>> position_share(torch.tensor([[[0.0], [2.0]], [[0.0], [2.0]]]))  # 2 images, 2 positions, 1 channel
        1.0
        >>> position_share(torch.tensor([[[0.0], [2.0]], [[2.0], [0.0]]]))  # the pair swapped: positions alike
        0.0

    """
    vectors = vectors.double()  # sums over ~10^5 patches
    between = vectors.mean(0).var(0, unbiased=False).sum()
    total = vectors.flatten(0, 1).var(0, unbiased=False).sum()
    return float(between / total) if total > 0 else 1.0


def greedy_coreset(vectors: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Choose ``count`` of ``vectors`` that cover them all: each next one the farthest from those chosen.

    The first is drawn with ``generator``. Every vector then lies within the largest
    nearest-chosen distance of some chosen vector, which the greedy choice keeps small (PatchCore's
    k-center selection, without its random projection).

    Args:
        vectors (torch.Tensor): Candidates ``(N, C)``.
        count (int): How many to choose; all when ``count >= N``.
        generator (torch.Generator): Draws the first.

    Returns:
        torch.Tensor: Sorted indices into ``vectors``.

    Example:
        >>> points = torch.tensor([[0.0], [0.1], [5.0], [10.0], [10.2]])
        >>> greedy_coreset(points, 3, torch.Generator().manual_seed(0)).tolist()  # one per cluster
        [0, 2, 4]

    """
    if count >= len(vectors):
        return torch.arange(len(vectors), device=vectors.device)
    squares = vectors.square().sum(1)
    chosen = torch.empty(count, dtype=torch.long, device=vectors.device)
    chosen[0] = int(torch.randint(len(vectors), (1,), generator=generator))
    nearest = torch.full_like(squares, float("inf"))
    for step in range(1, count):
        latest = vectors[chosen[step - 1]]
        distance = squares - 2 * (vectors @ latest) + latest.square().sum()
        nearest = torch.minimum(nearest, distance)
        chosen[step] = nearest.argmax()
    return chosen.sort().values


class FeatureMemory(nn.Module):
    """Distance of every patch of an image to its nearest normal patch.

    Args:
        size (int): Most patch vectors the memory keeps. Defaults to ``4096``.
        sampling (MemorySampling | str): ``"coreset"`` or ``"random"``. Defaults to ``"coreset"``.
        neighbourhood (int | Sequence[int]): Side of the window each level's features are
            averaged over, odd (``1`` leaves them as they are); with several, the patch is
            described at each and the descriptions joined. Defaults to ``(3, 1)``.
        dilation (int): Side of the window of positions whose largest distance each position
            takes, odd (``1``: none). Defaults to ``3``.
        whitening (bool | None): Measure distances in the space whitened by the normal patches'
            covariance (``True``) or in the features' own space (``False``); ``None`` chooses
            from the training images when fitting (see above). Defaults to ``None``.

    """

    def __init__(
        self,
        size: int = 4096,
        sampling: MemorySampling | str = MemorySampling.CORESET,
        neighbourhood: int | Sequence[int] = (3, 1),
        dilation: int = 3,
        whitening: bool | None = None,
    ) -> None:
        super().__init__()
        self.size = check_int(size, "memory_size")
        self.sampling = parse_enum(MemorySampling, sampling, "memory_sampling")
        windows = (neighbourhood,) if isinstance(neighbourhood, int) else tuple(neighbourhood)
        if not windows:
            msg = "memory_neighbourhood needs at least one window, e.g. 3 or [3, 1]."
            raise SmaiInputError(msg)
        self.neighbourhood = tuple(check_odd(window, "memory_neighbourhood") for window in windows)
        self.dilation = check_odd(dilation, "memory_dilation")
        self.whitening = whitening
        self.position_share: float | None = None  # measured when fitting
        # Empty until fitted; resized to a checkpoint's memory when one is loaded. The bank holds
        # whitened vectors (``centre`` and ``whiten`` map an embedding into that space). ``source``
        # holds the training image each vector came from, needed only by the calibration that
        # follows the fit, so it stays out of checkpoints and exports.
        self.register_buffer("bank", torch.empty(0))
        self.register_buffer("centre", torch.empty(0))
        self.register_buffer("whiten", torch.empty(0))
        self.register_buffer("source", torch.empty(0, dtype=torch.long), persistent=False)
        self.bank: torch.Tensor
        self.centre: torch.Tensor
        self.whiten: torch.Tensor
        self.source: torch.Tensor
        for name in ("bank", "centre", "whiten"):  # a checkpoint without a memory loads; scoring fits it
            allow_missing(self, name)

    @property
    def is_fitted(self) -> bool:
        """Whether the memory has been fitted (or loaded)."""
        return self.bank.numel() > 0 and self.whiten.numel() > 0

    @property
    def is_whitened(self) -> bool:
        """Whether the fitted (or loaded) memory measures distances in a whitened space."""
        identity = torch.eye(len(self.whiten), dtype=self.whiten.dtype, device=self.whiten.device)
        return self.whiten.numel() > 0 and not torch.equal(self.whiten, identity)

    @property
    def whitening_choice(self) -> str:
        """How the last fit measured the patches' dependence on their position, and what it chose, in words."""
        share = self.position_share
        why = (
            f"memory_whitening={self.whitening}"
            if self.whitening is not None
            else f"chosen: {'under' if share < POSITION_SHARE else 'at least'} {POSITION_SHARE}"
        )
        return (
            f"{share:.2f} of the normal patches' feature variance lies between positions; the memory measures "
            f"{'whitened' if self.is_whitened else 'unwhitened'} distances ({why})."
        )

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        if f"{prefix}whiten" not in state_dict:  # saved before the memory whitened: fitted again
            state_dict.pop(f"{prefix}bank", None)
        resize_to_saved(self, state_dict, prefix, ("bank", "centre", "whiten"))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _whitened(self, vectors: torch.Tensor) -> torch.Tensor:
        """Map vectors ``(..., C)`` into the memory's space: centred and whitened (as they are without whitening)."""
        return (vectors - self.centre) @ self.whiten

    def embed(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Describe every patch: each level averaged over the neighbourhood, on the first level's grid, joined.

        Args:
            levels (Sequence[torch.Tensor]): Feature maps ``(B, C_i, h_i, w_i)``, finest first.

        Returns:
            torch.Tensor: ``(B, windows * sum C_i, h_0, w_0)``, window by window in ``neighbourhood``'s order.

        """
        size = levels[0].shape[-2:]
        joined = []
        for window in self.neighbourhood:
            for level in levels:
                if window > 1:
                    level = F.avg_pool2d(level, window, stride=1, padding=window // 2)
                if level.shape[-2:] != size:
                    level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
                joined.append(level)
        return torch.cat(joined, dim=1)

    @torch.no_grad()
    def fit(self, embeddings: Iterable[torch.Tensor]) -> None:
        """Fill the memory from the patch embeddings of normal images.

        Args:
            embeddings (Iterable[torch.Tensor]): Per batch of images, their :meth:`embed`
                ``(B, C, h, w)``. Images are numbered in the order they come (``leave_out``
                refers to these numbers).

        Raises:
            ValueError: If there are fewer than two images.

        """
        vectors, sources, count = [], [], 0
        for batch in embeddings:
            vectors.append(batch.flatten(2).transpose(1, 2).flatten(0, 1))
            images = torch.arange(count, count + len(batch), device=batch.device)
            sources.append(images.repeat_interleave(batch.shape[2] * batch.shape[3]))
            count += len(batch)
        if count < 2:
            msg = f"The feature memory needs at least 2 normal images, got {count}."
            raise SmaiInputError(msg)
        every, source = torch.cat(vectors).float(), torch.cat(sources)
        self.position_share = position_share(every.unflatten(0, (count, -1)))  # images in order, positions within
        whiten = self.whitening if self.whitening is not None else self.position_share < POSITION_SHARE
        self._fit_whitening(every, whiten)
        every = self._whitened(every)
        generator = torch.Generator().manual_seed(SEED)
        if self.sampling == MemorySampling.CORESET:
            keep = greedy_coreset(every, self.size, generator)
        else:
            keep = torch.randperm(len(every), generator=generator)[: self.size].sort().values.to(every.device)
        self.bank = every[keep].contiguous()
        self.source = source[keep]

    def _fit_whitening(self, vectors: torch.Tensor, whiten: bool) -> None:
        """Fit ``centre`` and ``whiten`` to the normal vectors ``(N, C)``: the identity without whitening."""
        channels = vectors.shape[1]
        self.centre = vectors.new_zeros(channels)
        self.whiten = torch.eye(channels, dtype=vectors.dtype, device=vectors.device)
        if not whiten:
            return
        vectors = vectors.double()  # sums over ~10^5 patches
        centre = vectors.mean(0)
        centred = vectors - centre
        covariance = centred.T @ centred / max(1, len(vectors) - 1)
        values, axes = torch.linalg.eigh(covariance)
        values = values.clamp(min=0)
        if not values.any():  # normal patches that never vary have no scale to whiten by: kept as they are
            return
        values = values + SHRINKAGE * values.mean()  # every value now positive
        self.centre = centre.float()
        self.whiten = ((axes * values.rsqrt()) @ axes.T).float()

    def forward(
        self, embedding: torch.Tensor, size: tuple[int, int], leave_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Distance of each patch to its nearest normal patch vector, dilated, resized to ``size``: ``(B, 1, *size)``.

        Args:
            embedding (torch.Tensor): The images' :meth:`embed`, ``(B, C, h, w)``.
            size (tuple[int, int]): Size of the returned map.
            leave_out (torch.Tensor | None): For images the memory was fitted on, their numbers
                in the fit, ``(B,)``: each image's own vectors are left out. Defaults to ``None``.

        Raises:
            ValueError: If the memory is not fitted.

        """
        if not self.is_fitted:
            msg = "The feature memory is not fitted: SMAI fills it from the training images when fitting."
            raise SmaiInputError(msg)
        batch, _, height, width = embedding.shape
        queries = self._whitened(embedding.flatten(2).transpose(1, 2))  # (B, hw, C)
        bank_squares = self.bank.square().sum(1)
        chunk = max(1, CHUNK_VALUES // len(self.bank))
        if leave_out is not None:  # the same for every chunk of an image's positions
            own = self.source[None, None, :] == leave_out[:, None, None]  # (B, 1, N)
        nearest = []
        for start in range(0, height * width, chunk):
            part = queries[:, start : start + chunk]
            # The nearest vector by |b|^2 - 2 q.b (one matrix product per chunk), then its distance
            # computed exactly: the product form loses digits to cancellation (float32 and bf16 alike).
            squares = bank_squares - 2 * part @ self.bank.T
            if leave_out is not None:
                squares = squares.masked_fill(own, float("inf"))
            closest = self.bank[first_argmin(squares)]  # (B, chunk, C)
            nearest.append((part - closest).square().sum(2))
        distance = torch.cat(nearest, dim=1).sqrt().reshape(batch, 1, height, width)
        if self.dilation > 1:
            distance = F.max_pool2d(distance, self.dilation, stride=1, padding=self.dilation // 2)
        return F.interpolate(distance, size=size, mode="bilinear", align_corners=False)
