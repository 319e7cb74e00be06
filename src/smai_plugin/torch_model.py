"""PyTorch model of SMAI: a superpixel masker, PEN-Net, and the superpixel scoring.

In train mode the model inpaints a batch under given hole masks (the Lightning model draws
them with :meth:`SmaiModel.training_inputs`: whole images with random superpixel holes, or
crops around single superpixels for the windowed schedule). In eval mode it takes images and
returns anomalib's :class:`~anomalib.data.InferenceBatch`: the superpixel masker splits each
image, the scoring schedule decides which superpixels are masked together in each pass (and,
windowed, which crop a pass inpaints), PEN-Net inpaints every pass,
:class:`~smai_plugin.anomaly_map.AnomalyMapGenerator` compares the inpaintings with the image
(one difference map per score measure), and the normal statistics of
:mod:`smai_plugin.calibration` (fitted by :meth:`SmaiModel.calibrate`) turn the maps into the
anomaly map and the image score.

Everything in eval mode has shapes fixed by the configuration (``n_superpixels`` masks, a
fixed number of passes, fixed-size crops), so the whole pipeline traces for export.

Example:
    >>> model = SmaiModel(n_superpixels=16, base_channels=8).eval()
    >>> output = model(torch.rand(2, 3, 64, 64))
    >>> output.pred_score.shape, output.anomaly_map.shape
    (torch.Size([2]), torch.Size([2, 1, 64, 64]))

"""

import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from . import schedule
from ._config import check_int, parse_enum
from .anomaly_map import AnomalyMapGenerator, Comparison, smooth
from .calibration import Calibration, NormalStatistics
from .errors import SmaiInputError
from .memory import FeatureMemory, MemorySampling
from .pennet import N_LEVELS, PenNetGenerator, to_signed, to_unit_range
from .schedule import ScoringMode, crop_passes
from .similarity import PretrainedFeatures, ScoreMeasure, parse_measures
from .superpixel import SuperpixelCache, SuperpixelMasker

SIZE_MULTIPLE = 2**N_LEVELS
# Pixel values up to this far outside [0, 1] pass (resampling overshoots a little); 0-255 or normalised images do not.
VALUE_MARGIN = 0.5


def is_exporting() -> bool:
    """Whether the model is being traced or exported (then no check may depend on values)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


class ReconstructedBatch(NamedTuple):
    """anomalib's ``InferenceBatch`` fields, then the reconstruction ``(B, 3, H, W)`` in ``[0, 1]``.

    What :meth:`SmaiModel.forward` returns with ``reconstruct=True``: a named tuple like
    ``InferenceBatch``, so ``output.pred_score`` and ``output._asdict()`` work as for every
    anomalib model, and an export names each field as an output of the graph.
    """

    pred_score: torch.Tensor | None = None
    pred_label: torch.Tensor | None = None
    anomaly_map: torch.Tensor | None = None
    pred_mask: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None


def random_superpixels(superpixels: torch.Tensor, n_masked: int) -> torch.Tensor:
    """Masks of ``n_masked`` random non-empty superpixels per image (paper, section 3.2).

    Args:
        superpixels (torch.Tensor): Superpixel masks ``(B, K, H, W)``.
        n_masked (int): Superpixels to draw per image; where an image has fewer non-empty ones,
            the rest of the draw is empty masks.

    Returns:
        torch.Tensor: The drawn masks ``(B, min(n_masked, K), H, W)``.

    Example:
        >>> superpixels = torch.eye(4).reshape(1, 4, 2, 2)  # 4 one-pixel superpixels
        >>> random_superpixels(superpixels, 3).sum((2, 3)).tolist()
        [[1.0, 1.0, 1.0]]

    """
    return highest_masks(superpixels, torch.rand(superpixels.shape[:2], device=superpixels.device), n_masked)


def highest_masks(masks: torch.Tensor, priority: torch.Tensor, count: int) -> torch.Tensor:
    """Keep the ``count`` masks of each image with the highest ``priority``, highest first; empty ones last.

    Args:
        masks (torch.Tensor): Masks ``(B, K, H, W)``.
        priority (torch.Tensor): Non-negative priority of each mask, ``(B, K)``.
        count (int): Masks to keep; a fixed number, so the selection exports as a constant ``topk``.

    Returns:
        torch.Tensor: The kept masks ``(B, min(count, K), H, W)``.

    Example:
        >>> masks = torch.eye(3).reshape(1, 3, 3, 1) * torch.tensor([1.0, 0.0, 1.0])[:, None, None]  # mask 1 empty
        >>> highest_masks(masks, torch.tensor([[0.2, 0.9, 0.5]]), 2).flatten(2).argmax(2).tolist()
        [[2, 0]]

    """
    empty = masks.flatten(2).amax(2) == 0  # (B, K)
    chosen = priority.masked_fill(empty, -1.0).topk(min(count, masks.shape[1]), dim=1).indices
    return masks.gather(1, chosen[:, :, None, None].expand(-1, -1, *masks.shape[-2:]))


def random_superpixel_holes(superpixels: torch.Tensor, n_masked: int) -> torch.Tensor:
    """Hole mask made of ``n_masked`` random non-empty superpixels per image, ``(B, 1, H, W)``.

    Example:
        >>> superpixels = torch.eye(4).reshape(1, 4, 2, 2)
        >>> int(random_superpixel_holes(superpixels, 3).sum())
        3

    """
    return random_superpixels(superpixels, n_masked).sum(1, keepdim=True)


@functools.lru_cache(maxsize=8)
def _shrink_weights(size: int, new_size: int) -> np.ndarray:
    scale = size / new_size
    weights = np.zeros((new_size, size))
    for row in range(new_size):
        centre = scale * (row + 0.5)
        first, last = max(int(centre - scale + 0.5), 0), min(int(centre + scale + 0.5), size)
        triangle = np.clip(1 - np.abs((np.arange(first, last) - centre + 0.5) / scale), 0, None)
        weights[row, first:last] = triangle / triangle.sum()
    return weights.astype(np.float32)


def antialiased_shrink_weights(size: int, new_size: int) -> torch.Tensor:
    """Return the weights of torch's antialiased bilinear shrinking along one axis, ``(new_size, size)``.

    Each output pixel averages the input pixels within ``size / new_size`` of its centre with a
    triangle filter, as ``F.interpolate(..., mode="bilinear", antialias=True)`` does. Computed
    with NumPy, so the matrix is one constant in an exported graph.

    Example:
        >>> antialiased_shrink_weights(4, 2)
        tensor([[0.4286, 0.4286, 0.1429, 0.0000],
                [0.0000, 0.1429, 0.4286, 0.4286]])

    """
    return torch.from_numpy(_shrink_weights(size, new_size))


class SmaiModel(nn.Module):
    """SMAI: superpixel masking and inpainting.

    Args:
        n_superpixels (int): Superpixels per image (the paper's m). Defaults to ``77``.
        scoring (ScoringMode | str): Inference schedule (and, for ``"windowed"``, what training
            shows the network). Defaults to ``"windowed"``.
        score_measure (ScoreMeasure | str | Sequence[ScoreMeasure | str]): ``"ssim"`` (eq. 2),
            ``"l2"`` (eq. 3), ``"msgms"``, ``"features"``, ``"memory"``, or a list of them
            (averaged after calibration). Defaults to ``"ssim"``.
        comparison (Comparison | str): ``"per_pass"`` (the paper's) or ``"reconstruction"``
            (see :class:`~smai_plugin.anomaly_map.Comparison`). Defaults to ``"per_pass"``.
        calibration (Calibration | str): ``"none"``, ``"score"`` or ``"map"``: whether the image
            score, or the map and the score, are standardised with per-pixel statistics of
            normal maps (see :mod:`smai_plugin.calibration`; fitted by :meth:`calibrate`).
            Defaults to ``"none"``.
        top_k_fraction (float): Image score: mean of this share of the map's highest pixels;
            ``0`` takes the maximum. Defaults to ``0.0``.
        base_channels (int): PEN-Net width ``c``. Defaults to ``32``.
        compactness (float): SLIC compactness. Defaults to ``10.0``.
        slic_iterations (int): SLIC iterations. Defaults to ``10``.
        passes_per_batch (int): Most passes per image in one generator call at inference.
            Defaults to ``16``.
        sigma (float): Gaussian smoothing of the anomaly map. Defaults to ``4.0``.
        local_attention (bool): PEN-Net attends only from positions near the hole, in training
            and inference. Defaults to ``False``.
        attention_budget (float): With local attention, the share of positions whose attention
            is computed at inference. Defaults to ``1.0``.
        window_size (int): Side of the crop each pass inpaints with ``scoring="windowed"``, a
            multiple of 64. Defaults to ``64``.
        memory_size (int): With the ``memory`` measure, most normal patch vectors kept (see
            :mod:`smai_plugin.memory`). Defaults to ``4096``.
        memory_sampling (MemorySampling | str): How the memory chooses them: ``"coreset"`` or
            ``"random"``. Defaults to ``"coreset"``.
        memory_neighbourhood (int | Sequence[int]): Window(s) the memory's features are averaged
            over (odd; ``1``: none); with several, each patch is described at each, joined.
            Defaults to ``(3, 1)``.
        memory_dilation (int): Window of positions whose largest memory distance each position
            takes (odd; ``1``: none). Defaults to ``3``.
        memory_whitening (bool | None): Measure the memory's distances in the space whitened by
            the normal patches' covariance; ``None`` chooses from the training images (see
            :mod:`smai_plugin.memory`). Defaults to ``None``.
        image_score_measure (ScoreMeasure | str | Sequence[ScoreMeasure | str] | None): The
            measure(s) of ``score_measure`` whose calibrated maps give the image score; ``None``
            takes ``memory`` where it is measured, else them all. The anomaly map always averages
            all. Defaults to ``None``.
        inpaint_size (tuple[int, int] | None): Size the images are resized to for the superpixels,
            the inpainting and its measures, whose maps are resized back; the ``memory`` measure
            sees the images as they come. ``None`` inpaints them as they come. Defaults to ``None``.
        inpainted_superpixels (int | None): With the ``memory`` measure and one superpixel per
            pass (``windowed`` or ``leave_one_out``): when scoring, inpaint only this many
            superpixels per image, those whose mean memory distance is highest; elsewhere the
            inpainting's measures read as their normal mean (see :meth:`most_suspicious`). The
            calibration inpaints every superpixel. ``None`` inpaints every superpixel.
            Defaults to ``None``.

    """

    inpainted_superpixels: int | None = None  # also for models pickled before the setting existed

    def __init__(
        self,
        n_superpixels: int = 77,
        scoring: ScoringMode | str = ScoringMode.WINDOWED,
        score_measure: ScoreMeasure | str | Sequence[ScoreMeasure | str] = ScoreMeasure.SSIM,
        comparison: Comparison | str = Comparison.PER_PASS,
        calibration: Calibration | str = Calibration.NONE,
        top_k_fraction: float = 0.0,
        base_channels: int = 32,
        compactness: float = 10.0,
        slic_iterations: int = 10,
        passes_per_batch: int = 16,
        sigma: float = 4.0,
        local_attention: bool = False,
        attention_budget: float = 1.0,
        window_size: int = 64,
        memory_size: int = 4096,
        image_score_measure: ScoreMeasure | str | Sequence[ScoreMeasure | str] | None = None,
        inpaint_size: tuple[int, int] | None = None,
        memory_sampling: MemorySampling | str = MemorySampling.CORESET,
        memory_neighbourhood: int | Sequence[int] = (3, 1),
        memory_dilation: int = 3,
        memory_whitening: bool | None = None,
        inpainted_superpixels: int | None = None,
    ) -> None:
        super().__init__()
        check_int(window_size, "window_size", minimum=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE)  # PEN-Net's input
        self.window_size = window_size
        self.scoring = parse_enum(ScoringMode, scoring, "scoring")
        self.masker = SuperpixelMasker(n_superpixels, compactness, slic_iterations)
        self.training_superpixels = SuperpixelCache(self.masker)  # training sees the same images every epoch
        self.generator = PenNetGenerator(base_channels, local_attention)
        self.generator.set_query_budget(attention_budget)  # validates it
        self.attention_budget = attention_budget
        self.measures = parse_measures(score_measure)
        compared = [measure for measure in self.measures if measure != ScoreMeasure.MEMORY]
        uses_memory = ScoreMeasure.MEMORY in self.measures
        self.pretrained = PretrainedFeatures() if uses_memory or ScoreMeasure.FEATURES in compared else None
        # The inpainting and its comparison; the memory alone needs neither.
        self.anomaly_map_generator = (
            AnomalyMapGenerator(compared, comparison, passes_per_batch, sigma, self.pretrained) if compared else None
        )
        self.comparison = parse_enum(Comparison, comparison, "comparison")
        self.memory = (
            FeatureMemory(memory_size, memory_sampling, memory_neighbourhood, memory_dilation, memory_whitening)
            if uses_memory
            else None
        )
        if sigma < 0:
            msg = f"sigma must be non-negative, got {sigma}."
            raise SmaiInputError(msg)
        self.sigma = sigma
        self.inpaint_size = None if inpaint_size is None else tuple(inpaint_size)
        if self.inpaint_size is not None:
            if len(self.inpaint_size) != 2:
                msg = f"inpaint_size must be (height, width), got {inpaint_size}."
                raise SmaiInputError(msg)
            self.check_size(*self.inpaint_size)
        self.calibration = parse_enum(Calibration, calibration, "calibration")
        if len(self.measures) > 1 and self.calibration == Calibration.NONE:
            msg = "Several score measures are averaged on the normal images' scale: calibrate, or pick one measure."
            raise SmaiInputError(msg)
        if self.memory is not None and self.calibration == Calibration.NONE:
            msg = "score_measure 'memory' is fitted with the calibration, on the training images: calibrate."
            raise SmaiInputError(msg)
        if not 0 <= top_k_fraction < 1:
            msg = f"top_k_fraction must be in [0, 1), got {top_k_fraction}."
            raise SmaiInputError(msg)
        self.normal_statistics = NormalStatistics()
        self.top_k_fraction = top_k_fraction
        measures = self.measures
        if image_score_measure is not None:
            chosen = parse_measures(image_score_measure, "image_score_measure")
        else:  # the memory ranks images best wherever it was measured (docs/quality.md)
            chosen = (ScoreMeasure.MEMORY,) if uses_memory else measures
        if not set(chosen) <= set(measures):
            msg = (
                f"image_score_measure {[m.value for m in chosen]} must be among score_measure "
                f"{[m.value for m in measures]}."
            )
            raise SmaiInputError(msg)
        # Channels of the maps that give the image score, in the maps' order (a constant for export).
        self.image_score_channels = [index for index, measure in enumerate(measures) if measure in chosen]
        if inpainted_superpixels is not None:
            check_int(inpainted_superpixels, "inpainted_superpixels")
            if self.memory is None or self.anomaly_map_generator is None or self.scoring == ScoringMode.GROUPED:
                msg = (
                    "inpainted_superpixels needs the memory to rank the superpixels, an inpainting measure and one "
                    "superpixel per pass: score_measure with 'memory' and another measure, scoring 'windowed' or "
                    "'leave_one_out'."
                )
                raise SmaiInputError(msg)
        self.inpainted_superpixels = inpainted_superpixels
        self.register_load_state_dict_pre_hook(self._drop_unused_memory)

    @staticmethod
    def _drop_unused_memory(module: "SmaiModel", state_dict: dict, prefix: str, *args: Any) -> None:
        """Let a checkpoint with a feature memory load into a model that scores without one.

        The per-level memory of earlier versions is always dropped: the memory is fitted again.
        """
        del args
        unused = [f"{prefix}anomaly_map_generator.dissimilarity.memory."]
        if module.memory is None:
            unused.append(f"{prefix}memory.")
        for key in [key for key in state_dict if key.startswith(tuple(unused))]:
            del state_dict[key]

    @property
    def compared_channels(self) -> list[int]:
        """Channels of the maps that the inpainting's measures fill, in the maps' order."""
        return [index for index, measure in enumerate(self.measures) if measure != ScoreMeasure.MEMORY]

    def train(self, mode: bool = True) -> "SmaiModel":
        """Switch modes; the attention budget applies to inference only."""
        super().train(mode)
        self.generator.set_query_budget(1.0 if mode else self.attention_budget)
        return self

    def check_shape(self, images: torch.Tensor) -> None:
        """Raise a clear error for inputs PEN-Net cannot take.

        Raises:
            ValueError: If ``images`` is not ``(B, 3, H, W)``, or, without ``inpaint_size``, ``H``
                and ``W`` are not multiples of 64.

        """
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"SMAI expects RGB image batches of shape (B, 3, H, W), got {tuple(images.shape)}."
            raise SmaiInputError(msg)
        if self.inpaint_size is None:
            self.check_size(*images.shape[-2:])

    @staticmethod
    def check_values(images: torch.Tensor) -> None:
        """Refuse NaN or infinite pixels, and values far outside ``[0, 1]`` (0-255 or normalised images).

        A check of values, so it runs in Python calls only: an exported graph cannot raise, and there
        such pixels give NaN or meaningless scores (anomalib's inferencers feed it ``[0, 1]`` images).

        Raises:
            ValueError: If a pixel is not finite or lies outside ``[-0.5, 1.5]``.

        """
        finite = torch.isfinite(images).flatten(1).all(1)
        if not finite.all():
            msg = f"Images {(~finite).nonzero().flatten().tolist()} of the batch hold NaN or infinite pixels."
            raise SmaiInputError(msg)
        low, high = float(images.amin()), float(images.amax())
        if low < -VALUE_MARGIN or high > 1 + VALUE_MARGIN:
            msg = (
                f"SMAI expects RGB images in [0, 1], got values from {low:.3g} to {high:.3g}: divide 8-bit images by "
                "255, and do not normalise them (SMAI's pre-processor only resizes)."
            )
            raise SmaiInputError(msg)

    @staticmethod
    def check_size(height: int, width: int) -> None:
        """Refuse an image size PEN-Net cannot take: height and width positive multiples of 64.

        Raises:
            ValueError: If a side is not a positive multiple of 64.

        """
        if any(side < SIZE_MULTIPLE or side % SIZE_MULTIPLE for side in (height, width)):
            msg = (
                f"SMAI needs image height and width that are positive multiples of {SIZE_MULTIPLE} (PEN-Net "
                f"halves them {N_LEVELS} times), got {height}x{width}. Resize with the pre-processor, e.g. "
                f"Smai(image_size=(256, 256))."
            )
            raise SmaiInputError(msg)

    def forward(
        self,
        images: torch.Tensor,
        holes: torch.Tensor | None = None,
        reconstruct: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | InferenceBatch | ReconstructedBatch:
        """Inpaint under ``holes`` (train mode) or score ``images`` (eval mode).

        Args:
            images (torch.Tensor): RGB images in ``[0, 1]``, ``(B, 3, H, W)``.
            holes (torch.Tensor | None): Train mode only: hole masks ``(B, 1, H, W)``.
            reconstruct (bool): Eval mode: also return the reconstruction (see :meth:`compare`).
                Defaults to ``False``.

        Returns:
            Train mode: the inpainting in ``[-1, 1]`` and PEN-Net's pyramid outputs.
            Eval mode: ``InferenceBatch`` with ``pred_score`` ``(B,)`` and ``anomaly_map``
            ``(B, 1, H, W)``; with ``reconstruct``, a :class:`ReconstructedBatch` that adds the
            ``reconstruction`` (``None`` without inpainting, ``score_measure="memory"``).

        """
        self.check_shape(images)
        if self.training:
            if holes is None:
                msg = "In train mode SmaiModel inpaints under given holes: call model(images, holes)."
                raise SmaiInputError(msg)
            return self.generator(to_signed(images), holes)
        if not is_exporting():
            self.check_values(images)
        maps, reconstruction = self.compare(images, reconstruct=reconstruct)
        output = self.score_maps(maps)
        return ReconstructedBatch(*output, reconstruction=reconstruction) if reconstruct else output

    def score_maps(self, maps: torch.Tensor) -> InferenceBatch:
        """Turn difference maps ``(B, M, H, W)`` into the anomaly map and image score (see ``calibration``)."""
        if self.calibration == Calibration.NONE:
            return InferenceBatch(pred_score=self.image_score(maps), anomaly_map=maps)
        standardised = self.normal_statistics(maps)
        pred_score = self.image_score(standardised[:, self.image_score_channels].mean(dim=1, keepdim=True))
        if self.calibration == Calibration.MAP:
            anomaly_map = standardised.mean(dim=1, keepdim=True)
        else:
            anomaly_map = self.combine(self.normal_statistics.scale(maps))
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def combine(self, scaled: torch.Tensor) -> torch.Tensor:
        """Combine maps scaled to their normal level (exceeded by 0.1% of normal pixels) into one ``(B, 1, H, W)``.

        With the memory: its map, plus what each inpainting measure shows *beyond its normal level*
        (``max(0, map - 1)``): the inpainter's residual then adds what no normal image shows (a
        colour defect the features hardly see) without adding its everyday errors on textures it
        cannot restore (docs/quality.md measures both). Without the memory: the measures' mean.
        """
        if self.memory is None:
            return scaled.mean(dim=1, keepdim=True)
        channels = scaled.split(1, dim=1)
        memory = self.measures.index(ScoreMeasure.MEMORY)
        excess = [(channel - 1).clamp(min=0) for index, channel in enumerate(channels) if index != memory]
        return channels[memory] + sum(excess, torch.zeros_like(channels[memory]))

    def difference_maps(self, images: torch.Tensor, leave_out: torch.Tensor | None = None) -> torch.Tensor:
        """Smoothed difference maps before calibration, ``(B, M, H, W)``, one channel per measure.

        The inpainting's measures are computed at ``inpaint_size`` and resized to the images'
        size; the memory's at the images' size. ``leave_out``: see
        :meth:`~smai_plugin.memory.FeatureMemory.forward`.
        """
        return self.compare(images, leave_out)[0]

    def compare(
        self,
        images: torch.Tensor,
        leave_out: torch.Tensor | None = None,
        reconstruct: bool = False,
        every_superpixel: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the difference maps (see :meth:`difference_maps`) and, if asked, the reconstruction.

        The reconstruction shows what the image should have looked like: every pixel as the
        inpainting of the pass whose hole covered it (its superpixel, masked and inpainted from
        the rest), the original where no pass covered it; in ``[0, 1]``, at the images' size
        (from ``inpaint_size``, bilinear). ``None`` without inpainting (the memory alone).
        ``every_superpixel`` inpaints them all even with ``inpainted_superpixels`` (the calibration does).
        """
        size = images.shape[-2:]
        reconstruction = distance = None
        if self.memory is not None:
            distance = smooth(self.memory(self.memory_embedding(images), size, leave_out), self.sigma)
        maps = [distance] * len(self.measures)
        if self.anomaly_map_generator is not None:
            small = self.inpainting_input(images)
            window = self.window(small) if self.scoring == ScoringMode.WINDOWED else None
            holes = self.pass_holes(small)
            chosen = self.inpainted_superpixels is not None and not every_superpixel
            if chosen:
                holes = self.most_suspicious(holes, distance)
            compared, assembled = self.anomaly_map_generator.compare(
                self.generator, to_signed(small), holes, window, reconstruct
            )
            if compared.shape[-2:] != size:
                compared = F.interpolate(compared, size=size, mode="bilinear", align_corners=False)
            if chosen:  # elsewhere the measures read as normal
                covered = F.interpolate(holes.amax(dim=1, keepdim=True), size=size, mode="nearest") > 0
                compared = torch.where(covered, compared, self.normal_statistics.normal_mean(self.compared_channels))
            for index, channel in zip(self.compared_channels, compared.split(1, dim=1), strict=True):
                maps[index] = channel
            if reconstruct:
                reconstruction = to_unit_range(assembled)
                if reconstruction.shape[-2:] != size:
                    reconstruction = F.interpolate(reconstruction, size=size, mode="bilinear", align_corners=False)
        return torch.cat(maps, dim=1), reconstruction

    def most_suspicious(self, holes: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """Keep the ``inpainted_superpixels`` passes whose hole has the highest mean memory distance.

        The memory is cheap and already ranks regions; inpainting only its most suspicious
        superpixels keeps the inpainting's say where a defect can be, at a fixed number of passes
        (a static graph for export). Empty holes come last.

        Args:
            holes (torch.Tensor): One hole per pass, ``(B, P, h, w)`` at the inpainting's size.
            distance (torch.Tensor): The memory's map ``(B, 1, H, W)``.

        Returns:
            torch.Tensor: The chosen holes, ``(B, min(inpainted_superpixels, P), h, w)``, most suspicious first.

        """
        distance = F.interpolate(distance, size=holes.shape[-2:], mode="bilinear", align_corners=False)
        mean = (holes * distance).sum(dim=(2, 3)) / holes.sum(dim=(2, 3)).clamp(min=1)
        return highest_masks(holes, mean, self.inpainted_superpixels)

    def inpainting_input(self, images: torch.Tensor) -> torch.Tensor:
        """Resize images to ``inpaint_size`` (bilinear, antialiased), or leave them as they are.

        Shrinking is two products with constant matrices (:func:`antialiased_shrink_weights`):
        torch's antialiased ``interpolate`` exports to an ONNX ``Resize`` that OpenVINO computes
        differently (pixels up to 0.06 apart, which moved superpixel borders and the maps).
        """
        if self.inpaint_size is None or tuple(images.shape[-2:]) == self.inpaint_size:
            return images
        (height, width), (new_height, new_width) = images.shape[-2:], self.inpaint_size
        if new_height > height or new_width > width:
            return F.interpolate(images, size=self.inpaint_size, mode="bilinear", align_corners=False, antialias=True)
        rows = antialiased_shrink_weights(height, new_height).to(images)
        columns = antialiased_shrink_weights(width, new_width).to(images)
        return rows @ images @ columns.T

    def memory_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Describe the patches of images in ``[0, 1]`` for the memory (backbone blocks 2 and 4)."""
        return self.memory.embed(self.pretrained(to_signed(images))[1:])

    @property
    def is_calibrated(self) -> bool:
        """Whether the normal statistics, and the feature memory if there is one, are fitted (or loaded)."""
        return self.normal_statistics.is_fitted and (self.memory is None or self.memory.is_fitted)

    def map_settings(self) -> dict[str, Any]:
        """List the settings that shape the difference maps, as plain values (statistics fit only these)."""
        return {
            "n_superpixels": self.masker.n_superpixels,
            "compactness": self.masker.compactness,
            "slic_iterations": self.masker.slic_iterations,
            "scoring": self.scoring.value,
            "window_size": self.window_size,
            "local_attention": any(level.local for level in self.generator.attention),
            "attention_budget": self.attention_budget,
            "score_measure": [measure.value for measure in self.measures],
            "comparison": self.comparison.value,
            "sigma": self.sigma,
            "inpaint_size": None if self.inpaint_size is None else list(self.inpaint_size),
            **(
                {
                    "memory_size": self.memory.size,
                    "memory_sampling": self.memory.sampling.value,
                    "memory_neighbourhood": list(self.memory.neighbourhood),
                    "memory_dilation": self.memory.dilation,
                    "memory_whitening": self.memory.whitening,
                }
                if self.memory is not None
                else {}
            ),
        }

    def image_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Maximum of each map, or the mean of its ``top_k_fraction`` highest pixels, ``(B,)``."""
        values = anomaly_map.flatten(1)
        if self.top_k_fraction == 0:
            return values.amax(dim=1)
        k = max(1, round(self.top_k_fraction * values.shape[1]))  # fixed by the image size: exports as a constant
        return values.topk(k, dim=1).values.mean(dim=1)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Fit the feature memory, if any, then the normal statistics (eval mode, no gradients).

        The memory is filled from the images first; the statistics then come from the images'
        maps with each image's own features left out of the memory (see :mod:`smai_plugin.memory`).

        Args:
            batches (Iterable[torch.Tensor]): Batches of normal RGB images in ``[0, 1]``,
                ``(B, 3, H, W)``, at the size the model scores; iterated twice with a memory,
                in the same order.

        """
        if self.memory is not None and iter(batches) is batches:
            msg = "With the memory measure, calibrate takes batches it can iterate twice (a list or a loader)."
            raise SmaiInputError(msg)
        was_training = self.training
        self.eval()
        try:
            if self.memory is not None:
                self.memory.fit(self.memory_embedding(images) for images in batches)
            self.normal_statistics.fit(self._normal_maps(batches))
        finally:
            self.train(was_training)

    def _normal_maps(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Difference maps of the calibration images (every superpixel inpainted), numbered as the memory's fit."""
        first = 0
        for images in batches:
            leave_out = torch.arange(first, first + len(images), device=images.device)
            first += len(images)
            yield self.compare(images, leave_out if self.memory is not None else None, every_superpixel=True)[0]

    def training_inputs(self, images: torch.Tensor, n_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the training holes, matched to how ``scoring`` will use the generator.

        Whole images with ``n_masked`` random superpixels masked (the paper's training), or,
        with ``scoring="windowed"``, ``n_masked`` crops per image, each a ``window_size`` crop
        around one random superpixel that is masked: exactly what a windowed pass sees.

        Args:
            images (torch.Tensor): RGB images in ``[0, 1]``, ``(B, 3, H, W)``.
            n_masked (int): Superpixels masked per image.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: Images in ``[0, 1]`` and their hole masks.

        """
        images = self.inpainting_input(images)
        superpixels = self.training_superpixels(images)
        if self.scoring != ScoringMode.WINDOWED:
            return images, random_superpixel_holes(superpixels, n_masked)
        crops, holes, _ = crop_passes(images, random_superpixels(superpixels, n_masked), self.window(images))
        return crops, holes

    @property
    def training_family(self) -> str:
        """What :meth:`training_inputs` shows the generator: windowed crops or whole images."""
        if self.scoring == ScoringMode.WINDOWED:
            return f"{self.window_size}x{self.window_size} crops (scoring='windowed', window_size={self.window_size})"
        return "whole images (scoring='leave_one_out' or 'grouped')"

    def window(self, images: torch.Tensor) -> tuple[int, int]:
        """Crop of a windowed pass: ``window_size`` square, at most the image."""
        return min(self.window_size, images.shape[-2]), min(self.window_size, images.shape[-1])

    def pass_holes(self, images: torch.Tensor) -> torch.Tensor:
        """Hole mask of every inference pass, ``(B, passes, H, W)``, following ``scoring``."""
        return schedule.pass_holes(self.masker(images), self.scoring)
