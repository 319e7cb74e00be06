"""SMAI's default visualizer: anomalib's image visualizer with the reconstruction beside each image.

An inpainting detector can show what the part should have looked like: the superpixels it
inpainted, each from its normal surroundings, put back into the image (:class:`~smai_plugin.batch.SmaiImageBatch`'s
``reconstruction``). :class:`SmaiVisualizer` is anomalib's ``ImageVisualizer`` (same fields,
overlays, configuration and output files) that inserts that reconstruction as a panel after
the first one, so by default each picture reads image | reconstruction | ground truth |
image + anomaly map | image + predicted mask. Items without a reconstruction (another model's,
or SMAI's memory alone) get anomalib's picture unchanged.

Example:
    >>> from smai_plugin.batch import SmaiImageItem
    >>> item = SmaiImageItem(image=torch.rand(3, 64, 64), anomaly_map=torch.rand(1, 64, 64),
    ...                      pred_mask=torch.rand(1, 64, 64) > 0.5, reconstruction=torch.rand(3, 64, 64))
    >>> SmaiVisualizer(field_size=(64, 64)).visualize(item).size  # image, reconstruction, map, mask
    (256, 64)
    >>> SmaiVisualizer(reconstruction=False, field_size=(64, 64)).visualize(item).size
    (192, 64)

"""

from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import ImageBatch, ImageItem, NumpyImageBatch, NumpyImageItem
from anomalib.utils.path import generate_output_filename
from anomalib.visualization import ImageVisualizer
from anomalib.visualization.image.functional import add_text_to_image
from anomalib.visualization.image.item_visualizer import visualize_image_item
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

__all__ = ["SmaiVisualizer"]


def reconstruction_picture(reconstruction: torch.Tensor | np.ndarray) -> Image.Image:
    """Draw a reconstruction in ``[0, 1]``: ``(3, H, W)`` tensor or ``(H, W, 3)`` array.

    Example:
        >>> reconstruction_picture(torch.ones(3, 4, 5)).getpixel((0, 0))
        (255, 255, 255)

    """
    if isinstance(reconstruction, torch.Tensor):
        reconstruction = reconstruction.detach().float().cpu().permute(1, 2, 0).numpy()
    return Image.fromarray((np.clip(reconstruction, 0, 1) * 255).round().astype(np.uint8))


class SmaiVisualizer(ImageVisualizer):
    """anomalib's ``ImageVisualizer`` with SMAI's reconstruction as the second panel.

    Args:
        reconstruction (bool): Insert the reconstruction panel after the first one (the image);
            ``False`` draws anomalib's picture. Defaults to ``True``.
        fields (list[str] | None): As ``ImageVisualizer``. Defaults to ``None`` (image, ground truth).
        overlay_fields (list[tuple[str, list[str]]] | None): As ``ImageVisualizer``. Defaults to
            ``None`` (image + anomaly map, image + predicted mask).
        field_size (tuple[int, int]): Size ``(width, height)`` of every panel. Defaults to ``(256, 256)``.
        fields_config (dict[str, dict[str, Any]] | None): As ``ImageVisualizer``. Defaults to ``None``.
        overlay_fields_config (dict[str, dict[str, Any]] | None): As ``ImageVisualizer``. Defaults to ``None``.
        text_config (dict[str, Any] | None): As ``ImageVisualizer``; also titles the reconstruction panel.
            Defaults to ``None``.
        output_dir (str | Path | None): Where test and predict pictures go. Defaults to ``None``
            (``images/`` in the trainer's root, as anomalib's).

    Example:
        In YAML, to draw anomalib's picture without the reconstruction::

            model:
              class_path: smai_plugin.Smai
              init_args:
                visualizer:
                  class_path: smai_plugin.SmaiVisualizer
                  init_args:
                    reconstruction: false

    """

    def __init__(
        self,
        reconstruction: bool = True,
        fields: list[str] | None = None,
        overlay_fields: list[tuple[str, list[str]]] | None = None,
        field_size: tuple[int, int] = (256, 256),
        fields_config: dict[str, dict[str, Any]] | None = None,
        overlay_fields_config: dict[str, dict[str, Any]] | None = None,
        text_config: dict[str, Any] | None = None,
        output_dir: str | Path | None = None,
    ) -> None:
        super().__init__(
            fields, overlay_fields, field_size, fields_config, overlay_fields_config, text_config, output_dir
        )
        self.reconstruction = reconstruction

    def visualize_item(self, item: ImageItem | NumpyImageItem) -> Image.Image | None:
        """Draw anomalib's picture of one item, with the reconstruction panel after the first panel."""
        picture = visualize_image_item(
            item,
            fields=self.fields,
            overlay_fields=self.overlay_fields,
            field_size=self.field_size,
            fields_config=self.fields_config,
            overlay_fields_config=self.overlay_fields_config,
            text_config=self.text_config,
        )
        reconstruction = getattr(item, "reconstruction", None)
        if picture is None or reconstruction is None or not self.reconstruction:
            return picture
        panel = reconstruction_picture(reconstruction).resize(self.field_size)
        text = dict(self.text_config)
        if text.pop("enable", True):
            panel = add_text_to_image(panel, "Reconstruction", **text)
        width = self.field_size[0]  # anomalib draws its panels side by side, each field_size
        combined = Image.new("RGB", (picture.width + width, picture.height), "white")
        combined.paste(picture.crop((0, 0, width, picture.height)), (0, 0))
        combined.paste(panel, (width, 0))
        combined.paste(picture.crop((width, 0, picture.width, picture.height)), (2 * width, 0))
        return combined

    def visualize(
        self, predictions: ImageItem | NumpyImageItem | ImageBatch | NumpyImageBatch
    ) -> Image.Image | list[Image.Image | None] | None:
        """Draw an item, or each item of a batch (one picture for a batch of one), as ``ImageVisualizer``."""
        if isinstance(predictions, ImageItem | NumpyImageItem):
            return self.visualize_item(predictions)
        if isinstance(predictions, ImageBatch | NumpyImageBatch):
            pictures = [self.visualize_item(item) for item in predictions]
            return pictures[0] if len(pictures) == 1 else pictures
        return super().visualize(predictions)  # anomalib's error for anything else

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: ImageBatch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Save each scored item's picture where anomalib's visualizer saves it (predict does the same)."""
        del pl_module, outputs, batch_idx, dataloader_idx
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "images"
        datamodule = getattr(trainer, "datamodule", None)
        for item in batch:
            picture = self.visualize_item(item)
            if picture is not None:
                filename = generate_output_filename(
                    input_path=item.image_path or "",
                    output_path=self.output_dir,
                    dataset_name=getattr(datamodule, "name", None),
                    category=getattr(datamodule, "category", None),
                )
                picture.save(filename)
