"""A memory of normal pretrained features: how far each position is from everything normal.

SMAI's inpainting residual finds what the inpainter cannot restore from the context, but an
inpainter trained for minutes on a CPU also restores normal detail imperfectly, and a small
defect that it happens to restore well scores nothing. :class:`FeatureMemory` adds a second,
independent opinion, the way PatchCore scores: the pretrained features of the image at each
position (unit vectors of EfficientNet-Lite0 at strides 4, 8 and 16, as the ``features``
measure uses) are compared with a memory of the features of the normal training images, and
the distance to the nearest normal vector (``1 - cos``) is the position's value, upsampled to
the image and summed over the levels. It looks at the original only, never at the inpainting.

The memory is fitted before the calibration, on the same training images: at most ``size``
vectors per level, drawn at random (with a fixed seed, so every process and every rerun keeps
the same) from all training positions; 4096 per level scored within 0.004 of the whole memory
on bottle and hazelnut_toy (README, "Detection quality"). When the calibration scores those
training images, each image's own vectors are left out of the memory (``leave_out``):
otherwise its positions would find themselves and its normal maps would be 0.

The memory is a buffer: it travels in checkpoints and is a constant of the exported graph.

Example:
    >>> memory = FeatureMemory(size=100, n_levels=1)
    >>> normal = [[torch.nn.functional.normalize(torch.rand(2, 4, 8, 8), dim=1)] for _ in range(3)]
    >>> memory.fit(normal)
    >>> [bank.shape for bank in memory.banks]
    [torch.Size([100, 4])]
    >>> memory(normal[0], size=(32, 32)).shape
    torch.Size([2, 1, 32, 32])

"""

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from ._config import check_int
from .calibration import resize_to_saved
from .errors import SmaiInputError

# Scores of one chunk of query positions against the whole memory stay under this many values
# per image (16 MB in float32); the chunking depends on the image size and the memory only, so
# it exports as a fixed loop.
CHUNK_VALUES = 2**22
SEED = 0


def upsampled_sum(level_maps: Iterable[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Resize per-level maps ``(B, 1, h, w)`` to ``size`` (bilinear) and add them up."""
    total = None
    for level in level_maps:
        level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        total = level if total is None else total + level
    return total


class FeatureMemory(nn.Module):
    """Nearest-neighbour distance of features to a memory of normal features, per position.

    Args:
        size (int): Most feature vectors the memory keeps per level. Defaults to ``4096``.
        n_levels (int): Feature levels. Defaults to ``3``.

    """

    def __init__(self, size: int = 4096, n_levels: int = 3) -> None:
        super().__init__()
        self.size = check_int(size, "memory_size")
        self.n_levels = n_levels
        # Empty until fitted; resized to a checkpoint's memory when one is loaded. ``source_*``
        # holds the training image each vector came from, needed only by the calibration that
        # follows the fit, so it stays out of checkpoints and exports.
        for level in range(n_levels):
            self.register_buffer(f"bank_{level}", torch.empty(0))
            self.register_buffer(f"source_{level}", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_load_state_dict_post_hook(self._may_be_missing)

    @property
    def banks(self) -> list[torch.Tensor]:
        """The memory of each level, ``(N, C)`` unit vectors."""
        return [getattr(self, f"bank_{level}") for level in range(self.n_levels)]

    @property
    def is_fitted(self) -> bool:
        """Whether the memory has been fitted (or loaded)."""
        return all(bank.numel() > 0 for bank in self.banks)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        resize_to_saved(self, state_dict, prefix, (f"bank_{level}" for level in range(self.n_levels)))
        super()._load_from_state_dict(state_dict, prefix, *args)

    @staticmethod
    def _may_be_missing(module: nn.Module, incompatible_keys: nn.modules.module._IncompatibleKeys) -> None:
        """Let a checkpoint without a memory load: the memory stays empty, and scoring fits it."""
        del module
        for key in [key for key in incompatible_keys.missing_keys if key.rsplit(".", 1)[-1].startswith("bank_")]:
            incompatible_keys.missing_keys.remove(key)

    @torch.no_grad()
    def fit(self, features: Iterable[Sequence[torch.Tensor]]) -> None:
        """Fill the memory from the features of normal images.

        Args:
            features (Iterable[Sequence[torch.Tensor]]): Per batch of images, the unit feature
                maps of each level, ``(B, C, h, w)``. Images are numbered in the order they come
                (``leave_out`` refers to these numbers).

        Raises:
            ValueError: If there are fewer than two images.

        """
        levels: list[list[torch.Tensor]] = [[] for _ in range(self.n_levels)]
        sources: list[list[torch.Tensor]] = [[] for _ in range(self.n_levels)]
        count = 0
        for batch in features:
            if len(batch) != self.n_levels:
                msg = f"The feature memory holds {self.n_levels} levels, got features of {len(batch)}."
                raise SmaiInputError(msg)
            for level, maps in enumerate(batch):
                images = torch.arange(count, count + maps.shape[0], device=maps.device)
                levels[level].append(maps.flatten(2).transpose(1, 2).flatten(0, 1))
                sources[level].append(images.repeat_interleave(maps.shape[2] * maps.shape[3]))
            count += batch[0].shape[0]
        if count < 2:
            msg = f"The feature memory needs at least 2 normal images, got {count}."
            raise SmaiInputError(msg)
        generator = torch.Generator().manual_seed(SEED)
        for level in range(self.n_levels):
            vectors, source = torch.cat(levels[level]), torch.cat(sources[level])
            keep = torch.randperm(len(vectors), generator=generator)[: self.size].sort().values.to(vectors.device)
            setattr(self, f"bank_{level}", vectors[keep].contiguous())
            setattr(self, f"source_{level}", source[keep])

    def forward(
        self,
        features: Sequence[torch.Tensor],
        size: tuple[int, int],
        leave_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Distance of each position to its nearest normal vector, summed over levels: ``(B, 1, *size)``.

        Args:
            features (Sequence[torch.Tensor]): Unit feature maps of each level, ``(B, C, h, w)``.
            size (tuple[int, int]): Size of the returned map.
            leave_out (torch.Tensor | None): For images the memory was fitted on, their numbers
                in the fit, ``(B,)``: each image's own vectors are left out. Defaults to ``None``.

        Raises:
            ValueError: If the memory is not fitted.

        """
        if not self.is_fitted:
            msg = "The feature memory is not fitted: SMAI fills it from the training images when fitting."
            raise SmaiInputError(msg)
        level_maps = []
        for level, maps in enumerate(features):
            bank = getattr(self, f"bank_{level}")
            batch, _, height, width = maps.shape
            queries = maps.flatten(2).transpose(1, 2)  # (B, hw, C)
            chunk = max(1, CHUNK_VALUES // len(bank))
            if leave_out is not None:  # the same for every chunk of an image's positions
                own = getattr(self, f"source_{level}")[None, None, :] == leave_out[:, None, None]  # (B, 1, N)
            nearest = []
            for start in range(0, height * width, chunk):
                similarity = queries[:, start : start + chunk] @ bank.T  # (B, chunk, N)
                if leave_out is not None:
                    similarity = similarity.masked_fill(own, -2.0)  # below any cosine
                nearest.append(similarity.amax(dim=2))
            distance = 1 - torch.cat(nearest, dim=1)
            level_maps.append(distance.reshape(batch, 1, height, width))
        return upsampled_sum(level_maps, size)
