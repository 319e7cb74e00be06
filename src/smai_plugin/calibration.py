"""Calibration of SMAI's difference maps against normal images.

An inpainter restores some parts of every normal image worse than others (a bottle's bright,
detailed rim, the edges of a screw): that error is the same in good and defective images, yet
in a raw difference map it sets the image score. :class:`NormalStatistics` learns, per pixel
position and per score measure, the mean and the spread of the maps of normal training images
and turns a map into a standardised residual: ``(map - mean) / spread``. An error that every
normal image shows stops counting; one that normal images never show stands out. This is the
way PaDiM treats features, applied to SMAI's residuals.

The spread is floored at its ``floor_quantile`` over the image (per measure), so that positions
where normal images happen to agree closely (a flat background) do not turn tiny differences
into large scores.

Standardising helps the image score most; the map itself localises defects better before it
(a defect where normal residuals are high, on a bottle's rim, shrinks with them), so
:class:`Calibration` offers both: ``score`` standardises for the image score only and puts each
measure's map on the scale of its *normal level*, the value its normal maps exceed in only
``LEVEL_QUANTILE`` (0.1%) of their pixels; ``map`` standardises the map too. On that scale a value
above 1 is more than any normal image shows (see :class:`~smai_plugin.torch_model.SmaiModel` for
how the measures are combined).

The statistics are buffers: they travel in checkpoints and are constants of the exported graph.
:class:`SmaiCalibrationMixin` fits them as part of training: the Lightning model calibrates on
the training split when scoring starts, if its statistics are missing or older than its weights.

Example:
    >>> statistics = NormalStatistics()
    >>> normal = [torch.rand(4, 2, 8, 8) for _ in range(3)]  # batches of 2-measure maps
    >>> statistics.fit(normal)
    >>> statistics.mean.shape, statistics.level.shape, statistics.is_fitted
    (torch.Size([1, 2, 8, 8]), torch.Size([1, 2, 1, 1]), True)
    >>> statistics(torch.rand(1, 2, 8, 8)).shape
    torch.Size([1, 2, 8, 8])

"""

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from enum import Enum

import torch
from anomalib.data import Batch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader

from .errors import SmaiInputError


def resize_to_saved(module: nn.Module, state_dict: dict, prefix: str, names: Iterable[str]) -> None:
    """Give ``module``'s buffers ``names`` the shapes saved in ``state_dict``, before it is loaded.

    For buffers whose size depends on the data they were fitted on (empty until then).
    """
    for name in names:
        if f"{prefix}{name}" in state_dict:
            setattr(module, name, getattr(module, name).new_empty(state_dict[f"{prefix}{name}"].shape))


def _drop_missing(suffix: str, _: nn.Module, incompatible_keys: nn.modules.module._IncompatibleKeys) -> None:
    for key in [key for key in incompatible_keys.missing_keys if key.endswith(suffix)]:
        incompatible_keys.missing_keys.remove(key)


def allow_missing(module: nn.Module, suffix: str) -> None:
    """Let state dicts without the keys ending in ``suffix`` load into ``module``: those buffers stay empty.

    For fitted buffers a checkpoint may lack (saved before they existed, or never fitted): the
    model then counts as unfitted and fits them again. (A ``partial``, not a closure: models
    are pickled by the Torch export.)
    """
    module.register_load_state_dict_post_hook(functools.partial(_drop_missing, suffix))


MIN_CALIBRATION_IMAGES = 2  # a spread needs two maps
FEW_CALIBRATION_IMAGES = 10  # below this SMAI warns that its calibration is rough


class Calibration(str, Enum):
    """How the normal statistics are used.

    ``none``: raw difference maps (one measure only). ``score``: the image score comes from the
    standardised maps; the anomaly map combines the measures' maps, each divided by its normal
    level (:meth:`~smai_plugin.torch_model.SmaiModel.combine`). ``map``: the anomaly map is the standardised maps'
    average, and the image score comes from it.
    """

    NONE = "none"
    SCORE = "score"
    MAP = "map"


LEVEL_QUANTILE = 0.999  # a measure's normal level: exceeded by 0.1% of the normal maps' pixels
LEVEL_STRIDE = 4  # every 4th pixel of each (smoothed) map, each way, estimates the level


class NormalStatistics(nn.Module):
    """Per-pixel mean and spread of normal difference maps, and each measure's normal level.

    Args:
        floor_quantile (float): The spread is at least this quantile of the spread over all
            pixel positions (per measure), in ``[0, 1]``. Defaults to ``0.25``.

    """

    def __init__(self, floor_quantile: float = 0.25) -> None:
        super().__init__()
        if not 0 <= floor_quantile <= 1:
            msg = f"floor_quantile must be in [0, 1], got {floor_quantile}."
            raise SmaiInputError(msg)
        self.floor_quantile = floor_quantile
        # Empty until fitted; resized to the checkpoint's statistics when one is loaded.
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("spread", torch.empty(0))
        self.register_buffer("level", torch.empty(0))
        self.mean: torch.Tensor
        self.spread: torch.Tensor
        self.level: torch.Tensor
        allow_missing(self, "normal_statistics.level")  # statistics saved before the level existed refit

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        resize_to_saved(self, state_dict, prefix, ("mean", "spread", "level"))
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def is_fitted(self) -> bool:
        """Whether statistics have been fitted (or loaded)."""
        return self.mean.numel() > 0 and self.level.numel() > 0

    def reset(self) -> None:
        """Forget the statistics."""
        self.mean = self.mean.new_empty(0)
        self.spread = self.spread.new_empty(0)
        self.level = self.level.new_empty(0)

    @torch.no_grad()
    def fit(self, maps: Iterable[torch.Tensor]) -> None:
        """Fit the statistics to the maps of normal images.

        Args:
            maps (Iterable[torch.Tensor]): Batches of maps ``(B, M, H, W)``, all of one size.

        Raises:
            ValueError: If ``maps`` is empty or has fewer than two images.

        """
        count, total, squares, samples = 0, 0.0, 0.0, []
        for batch in maps:
            samples.append(batch[..., ::LEVEL_STRIDE, ::LEVEL_STRIDE].transpose(0, 1).flatten(1))
            batch = batch.double()  # sums of squares over many images: float64 keeps the variance exact
            total = total + batch.sum(0, keepdim=True)
            squares = squares + batch.square().sum(0, keepdim=True)
            count += batch.shape[0]
        if count < 2:
            msg = f"Calibration needs at least 2 normal images, got {count}."
            raise SmaiInputError(msg)
        mean = total / count
        spread = ((squares - count * mean.square()).clamp(min=0) / (count - 1)).sqrt()
        floor = spread.flatten(2).quantile(self.floor_quantile, dim=2)[..., None, None]
        self.mean = mean.to(self.mean.dtype)
        self.spread = torch.maximum(spread, floor).clamp(min=torch.finfo(torch.float32).tiny).to(self.spread.dtype)
        values = torch.cat(samples, dim=1)  # (M, sampled pixels)
        rank = min(values.shape[1], math.ceil(LEVEL_QUANTILE * values.shape[1]))
        level = values.kthvalue(rank, dim=1).values.clamp(min=torch.finfo(torch.float32).tiny)
        self.level = level.reshape(1, -1, 1, 1).to(self.mean.dtype)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Standardise ``maps`` ``(B, M, H, W)``: ``(maps - mean) / spread``.

        Raises:
            ValueError: If the statistics are missing or were fitted on maps of another shape.

        """
        self._check(maps)
        return (maps - self.mean) / self.spread

    def scale(self, maps: torch.Tensor) -> torch.Tensor:
        """Divide each measure's map by its normal level (exceeded by 0.1% of the normal maps' pixels).

        Raises:
            ValueError: If the statistics are missing or were fitted on maps of another shape.

        """
        self._check(maps)
        return maps / self.level

    def normal_mean(self, channels: list[int]) -> torch.Tensor:
        """Return the normal mean maps of the measures ``channels``, ``(1, len(channels), H, W)``.

        Raises:
            ValueError: If the statistics are missing.

        """
        self._check_fitted()
        return self.mean[:, channels]

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            msg = "The normal statistics are not fitted: SMAI calibrates on the training images when fitting."
            raise SmaiInputError(msg)

    def _check(self, maps: torch.Tensor) -> None:
        self._check_fitted()
        if maps.shape[1] != self.mean.shape[1]:
            msg = (
                f"The normal statistics were fitted for {self.mean.shape[1]} score measure(s), but the model now "
                f"scores with {maps.shape[1]}: score_measure changed since the calibration (e.g. a checkpoint loaded "
                "with another score_measure). Score through anomalib's Engine with the training images, which "
                "calibrates again, or keep the checkpoint's score_measure."
            )
            raise SmaiInputError(msg)
        if maps.shape[2:] != self.mean.shape[2:]:
            msg = (
                f"Maps of {maps.shape[2]}x{maps.shape[3]} pixels cannot be calibrated with statistics fitted on "
                f"{self.mean.shape[2]}x{self.mean.shape[3]}: score images at the size the model was trained at."
            )
            raise SmaiInputError(msg)


class _Prepared:
    """A loader's batches prepared by ``prepare``; iterable twice (the feature memory's fit, then the maps)."""

    def __init__(self, loader: DataLoader, prepare: Callable[[Batch], torch.Tensor]) -> None:
        self.loader, self.prepare = loader, prepare

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self.prepare(batch) for batch in self.loader)


class SmaiCalibrationMixin:
    """Calibration of :class:`~smai_plugin.Smai` on its training images, after training.

    Mixed in before ``AnomalibModule``; reads the Lightning model's ``model`` (the torch model),
    ``trainer``, ``pre_processor`` and ``_calibration_stale``.
    """

    def calibrate(self) -> None:
        """Fit the normal statistics on the training images, when they are missing or stale.

        Runs when scoring starts (validation, test, predict) if the model calibrates and its
        statistics are missing or older than its weights. Only the datamodule's training split
        is scored (never the validation or test images), in order and without shuffling, at the
        evaluation batch size; every process scores all of it, so all hold the same statistics.

        Raises:
            ValueError: If statistics are needed and there are no training images to fit them on.

        """
        if not self.needs_calibration:
            return
        datamodule = self.trainer.datamodule
        dataset = getattr(datamodule, "train_data", None)
        if dataset is None or len(dataset) == 0:
            if self.model.is_calibrated:
                rank_zero_warn("SMAI: no training images to calibrate on; keeping the statistics from before training.")
                return
            msg = (
                "SMAI calibrates its anomaly maps on the normal training images before scoring, but this model "
                "has no statistics and no training images are available: fit it first, load the checkpoint of a "
                "fitted model, or pass a datamodule that has the training images."
            )
            raise SmaiInputError(msg)
        loader = DataLoader(
            dataset,
            batch_size=datamodule.eval_batch_size,
            shuffle=False,
            num_workers=datamodule.num_workers,
            collate_fn=dataset.collate_fn,
        )
        rank_zero_info(f"SMAI: calibrating on the {len(dataset)} normal training images.")
        self.model.calibrate(_Prepared(loader, self._calibration_images))
        self._calibration_stale = False
        if self.model.memory is not None and self.model.memory.position_share is not None:
            rank_zero_info(f"SMAI: {self.model.memory.whitening_choice}")

    def check_calibration_images(self) -> None:
        """Before training: refuse too few normal training images to calibrate on, warn when they are few.

        Raises:
            ValueError: If the model calibrates and the training split has fewer than two images.

        """
        dataset = getattr(self.trainer.datamodule, "train_data", None)
        if self.model.calibration == Calibration.NONE or dataset is None:
            return
        count = len(dataset)
        if count < MIN_CALIBRATION_IMAGES:
            msg = (
                f"SMAI calibrates on its normal training images after training and needs at least "
                f"{MIN_CALIBRATION_IMAGES}, got {count}: add training images (tens are typical), or train without "
                "calibration (calibration='none' with one score_measure other than 'memory')."
            )
            raise SmaiInputError(msg)
        if count < FEW_CALIBRATION_IMAGES:
            rank_zero_warn(
                f"SMAI calibrates on only {count} normal training images: its normal statistics (and feature memory) "
                f"are rough, so scores and thresholds are less reliable. {FEW_CALIBRATION_IMAGES} or more are better."
            )

    @property
    def needs_calibration(self) -> bool:
        """Whether the model calibrates and its statistics are missing or older than its weights.

        Scoring starts by calibrating when this is true; scripts that score or export a model
        outside `Engine` check it to calibrate first (see `benchmarks/`).
        """
        return self.model.calibration != Calibration.NONE and (self._calibration_stale or not self.model.is_calibrated)

    def _calibration_images(self, batch: Batch) -> torch.Tensor:
        """Prepare a training batch as the model scores it: on its device, through the pre-processor."""
        images = batch.image.to(self.device)
        self.check_finite(batch)
        return self.pre_processor.transform(images) if self.pre_processor else images
