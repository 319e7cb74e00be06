"""anomalib's image dataclasses with one more field: SMAI's ``reconstruction``.

What the part should have looked like: the superpixels SMAI inpainted, each from its normal
context, put back into the image (see :meth:`~smai_plugin.anomaly_map.AnomalyMapGenerator.compare`).
anomalib 2.7's ``ImageBatch`` has no field for it, and its callbacks work on the batch object
itself (the post-processor normalises it in place, the evaluator and the visualizer read it),
so SMAI's scoring steps make each ``ImageBatch`` a :class:`SmaiImageBatch` in place
(:func:`with_reconstruction`) before they fill it: the same object, so every callback sees
the reconstruction; a subclass, so everything that reads an ``ImageBatch`` reads it unchanged;
and a dataclass field, so the reconstruction survives post-processing, iteration into items
(``SmaiImageItem``) and ``to_numpy()``. (A new object from Lightning's ``on_after_batch_transfer``
would do the same, but Lightning then warns on every run that comes with a datamodule.)

Example:
    >>> from anomalib.data import ImageBatch
    >>> batch = with_reconstruction(ImageBatch(image=torch.rand(2, 3, 64, 64)))
    >>> batch.update(reconstruction=torch.rand(2, 3, 64, 64)).reconstruction.shape
    torch.Size([2, 3, 64, 64])
    >>> [item.reconstruction.shape for item in batch]
    [torch.Size([3, 64, 64]), torch.Size([3, 64, 64])]

"""

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from anomalib.data import ImageBatch, ImageItem, NumpyImageBatch, NumpyImageItem
from anomalib.data.dataclasses.generic import FieldDescriptor

__all__ = ["SmaiImageBatch", "SmaiImageItem", "SmaiNumpyImageBatch", "SmaiNumpyImageItem", "with_reconstruction"]


class _OptionalField(FieldDescriptor):
    """A field that defaults to ``None``.

    anomalib's descriptor finds that out from the class's type hints, which it cannot resolve on
    a subclass of its batches (``BatchIterateMixin`` annotates with a name it imports for type
    checking only).
    """

    def is_optional(self, owner: type) -> bool:
        """Say yes: the field is ``None`` until SMAI scores the batch."""
        del owner
        return True


def _check_colour_images(value: Any, dimensions: int, kind: type, channel_axis: int) -> Any:
    """Accept ``None`` or a ``kind`` array of ``dimensions`` axes with 3 colour channels on ``channel_axis``."""
    if value is None:
        return None
    if not isinstance(value, kind) or value.ndim != dimensions or value.shape[channel_axis] != 3:
        shape = getattr(value, "shape", None)
        msg = f"reconstruction must be a {kind.__name__} of {dimensions} axes with 3 colour channels, got {shape}."
        raise ValueError(msg)
    return value


def _channels_last(value: Any) -> Any:
    """Move the colour axis of a channels-first array (what ``to_numpy()`` of a tensor gives) last."""
    if isinstance(value, np.ndarray) and value.ndim >= 3 and value.shape[-3] == 3 and value.shape[-1] != 3:
        return np.moveaxis(value, -3, -1)
    return value


@dataclass
class SmaiNumpyImageItem(NumpyImageItem):
    """anomalib's ``NumpyImageItem`` with SMAI's ``reconstruction``, ``(H, W, 3)`` in ``[0, 1]``."""

    reconstruction: FieldDescriptor[np.ndarray | None] = _OptionalField(validator_name="validate_reconstruction")  # noqa: RUF009

    @staticmethod
    def validate_reconstruction(reconstruction: np.ndarray | None) -> np.ndarray | None:
        """Check the reconstruction's type and shape (channels last, as anomalib's numpy images)."""
        return _check_colour_images(_channels_last(reconstruction), 3, np.ndarray, -1)


@dataclass
class SmaiNumpyImageBatch(NumpyImageBatch):
    """anomalib's ``NumpyImageBatch`` with SMAI's ``reconstruction``, ``(B, H, W, 3)`` in ``[0, 1]``."""

    reconstruction: FieldDescriptor[np.ndarray | None] = _OptionalField(validator_name="validate_reconstruction")  # noqa: RUF009
    item_class: ClassVar[type[SmaiNumpyImageItem]] = SmaiNumpyImageItem

    @staticmethod
    def validate_reconstruction(reconstruction: np.ndarray | None) -> np.ndarray | None:
        """Check the reconstruction's type and shape (channels last, as anomalib's numpy images)."""
        return _check_colour_images(_channels_last(reconstruction), 4, np.ndarray, -1)


@dataclass
class SmaiImageItem(ImageItem):
    """anomalib's ``ImageItem`` with SMAI's ``reconstruction``, ``(3, H, W)`` in ``[0, 1]``."""

    reconstruction: FieldDescriptor[torch.Tensor | None] = _OptionalField(validator_name="validate_reconstruction")  # noqa: RUF009
    numpy_class: ClassVar[type[SmaiNumpyImageItem]] = SmaiNumpyImageItem

    @staticmethod
    def validate_reconstruction(reconstruction: torch.Tensor | None) -> torch.Tensor | None:
        """Check the reconstruction's type and shape."""
        return _check_colour_images(reconstruction, 3, torch.Tensor, 0)


@dataclass
class SmaiImageBatch(ImageBatch):
    """anomalib's ``ImageBatch`` with SMAI's ``reconstruction``, ``(B, 3, H, W)`` in ``[0, 1]``.

    ``None`` until SMAI scores the batch, and for a model without inpainting (``score_measure="memory"``).
    """

    reconstruction: FieldDescriptor[torch.Tensor | None] = _OptionalField(validator_name="validate_reconstruction")  # noqa: RUF009
    item_class: ClassVar[type[SmaiImageItem]] = SmaiImageItem
    numpy_class: ClassVar[type[SmaiNumpyImageBatch]] = SmaiNumpyImageBatch

    @staticmethod
    def validate_reconstruction(reconstruction: torch.Tensor | None) -> torch.Tensor | None:
        """Check the reconstruction's type and shape."""
        return _check_colour_images(reconstruction, 4, torch.Tensor, 1)


def with_reconstruction(batch: Any) -> Any:
    """Make an ``ImageBatch`` a :class:`SmaiImageBatch` in place, its reconstruction ``None``; return it.

    Any other batch (already SMAI's, or depth and video batches) is returned as it is.
    """
    if type(batch) is ImageBatch:
        batch.__class__ = SmaiImageBatch  # adds one field, whose value lives in the instance's dict
        batch.__dict__["reconstruction"] = None
    return batch
