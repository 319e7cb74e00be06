"""Checks of dataset files that anomalib's data loading gets silently wrong or reports poorly.

anomalib reads every image with ``PIL.Image.open(path).convert("RGB")`` and every mask with
``convert("L")``; the pre-processor then resizes image and mask together. That is fine for
8-bit grayscale (copied to three channels), palette and RGBA images (alpha dropped) and for
16-bit RGB PNGs (Pillow reads them as 8-bit RGB), but:

* a 16- or 32-bit single-channel image (Pillow modes ``I;16``, ``I``, ``F``) is clipped to
  ``[0, 255]``, so it comes out almost white: a silent wrong answer;
* a truncated or corrupt file fails with ``OSError: image file is truncated``, which does not
  name the file;
* a mask whose size differs from its image's is stretched to the image's size without notice;
* an empty training folder fails inside the data loader's sampler with
  ``num_samples should be a positive integer value, but got num_samples=0``;
* training files that the MVTecAD layout skips (not ``.png``, or symbolic links leading out of
  the dataset folder) are dropped without notice;
* a defective test image without its mask fails while the data module builds its table, in
  pandas (``Must have equal len keys and value ...``) or NumPy, naming no file;
* an MVTecAD ``root``/``category`` that does not exist starts a download of MVTec AD, which
  cannot help for a category MVTec AD does not have (offline: a long ``URLError`` trace).

:func:`check_dataset` refuses these with a ``ValueError`` that names the file (skipped training
files that leave some images to train on get a warning instead). The
Lightning model calls it when fitting, testing and predicting start. It decodes every image
once, which costs far less than SMAI's scoring of the same images. :func:`check_layout` checks
the folders of the last two before the data module reads them (from the model's
``configure_callbacks``, the first hook Lightning calls, before the data module's
``prepare_data`` and ``setup``). :class:`SmaiDataChecksMixin` holds these hooks of the model.

Example:
    >>> from anomalib.data.datasets import MVTecADDataset
    >>> check_dataset(MVTecADDataset(root="datasets/MVTecAD", category="bottle"), "test")  # doctest: +SKIP

"""

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from anomalib.data import Batch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import SmaiInputError, listing

__all__ = [
    "HIGH_BIT_DEPTH_MODES",
    "SmaiDataChecksMixin",
    "check_dataloaders",
    "check_dataset",
    "check_image_file",
    "check_layout",
    "skipped_training_files",
]

MVTEC_EXTENSIONS = (".png", ".PNG")
"""The file endings anomalib's MVTecAD layout reads."""

HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
"""Single-channel Pillow modes that ``convert("RGB")`` clips to 8 bits instead of rescaling."""

MAX_UPSCALING = 4
"""Most enlargement per side by the pre-processor before SMAI warns that the images are too small."""


def _read(path: str | Path, kind: str) -> Image.Image:
    """Decode the whole file, so truncation shows up here with the file's name."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
        msg = f"Cannot read {kind} file {path} ({error}). It is missing, truncated or corrupt: replace or remove it."
        raise SmaiInputError(msg) from error


def check_image_file(path: str | Path) -> tuple[int, int]:
    """Refuse an image file that anomalib cannot read, or would read wrongly.

    Args:
        path (str | Path): Image file.

    Returns:
        tuple[int, int]: Width and height of the image.

    Raises:
        ValueError: If the file cannot be decoded or holds a 16/32-bit single-channel image.

    """
    image = _read(path, "image")
    if image.mode in HIGH_BIT_DEPTH_MODES:
        msg = (
            f"Image {path} has {image.mode!r} pixels (16/32-bit single channel). anomalib reads images as 8-bit "
            "RGB and would clip it to nearly white. Convert it to 8 bits first, e.g. with Pillow: "
            "Image.fromarray((np.asarray(image) >> 8).astype(np.uint8)) for 16-bit data."
        )
        raise SmaiInputError(msg)
    return image.size


def skipped_training_files(folder: str | Path) -> list[Path]:
    """Files in ``<folder>/train/good`` that anomalib's MVTecAD layout does not read.

    It reads ``.png`` and ``.PNG`` files only, and drops symbolic links that lead outside the
    dataset's folder.
    """
    train = Path(folder) / "train" / "good"
    if not train.is_dir():
        return []
    category = Path(folder).resolve()
    return [
        path
        for path in sorted(train.iterdir())
        if not path.name.startswith(".")
        and (path.suffix not in MVTEC_EXTENSIONS or (path.is_symlink() and category not in path.resolve().parents))
    ]


def _skipped_note(skipped: list[Path]) -> str:
    if not skipped:
        return ""
    names = listing([path.name for path in skipped])
    return (
        f" anomalib's MVTecAD layout skips {len(skipped)} file(s) in {skipped[0].parent} ({names}): it reads .png "
        "files only, and no symbolic links that lead outside the dataset folder. Convert them to PNG, or copy "
        "them in."
    )


def check_dataset(dataset: Dataset, split: str) -> tuple[int, int] | None:
    """Check every image (and mask) of an anomalib dataset before SMAI uses it.

    Datasets with a ``samples`` table (anomalib's ``AnomalibDataset``) and with an
    ``image_filenames`` list (anomalib's ``PredictDataset``) are checked; other datasets are
    left alone.

    Args:
        dataset (Dataset): Dataset, possibly wrapped in a ``torch.utils.data.Subset``.
        split (str): Name of the split, for the messages (``"train"``, ``"val"``, ...).

    Returns:
        tuple[int, int] | None: Width and height of the smallest image (by area), if any.

    Raises:
        ValueError: If the training split is empty, if a file cannot be decoded, holds a
            16/32-bit single-channel image, or if a mask's size differs from its image's.

    """
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    sizes = []
    samples = getattr(dataset, "samples", None)
    if samples is not None and hasattr(samples, "itertuples"):
        folder = next((getattr(dataset, key) for key in ("root_category", "root") if hasattr(dataset, key)), None)
        skipped = skipped_training_files(folder) if split == "train" and folder is not None else []
        if split == "train" and len(samples) == 0:
            where = f" in {folder}" if folder is not None else ""
            msg = (
                f"The training set is empty: no images were found{where}. SMAI learns from normal images; put them "
                f"in train/good (MVTecAD layout) or in the Folder datamodule's normal_dir.{_skipped_note(skipped)}"
            )
            raise SmaiInputError(msg)
        if skipped:
            warnings.warn(f"Some training files are not used.{_skipped_note(skipped)}", stacklevel=2)
        for sample in samples.itertuples():
            size = check_image_file(sample.image_path)
            sizes.append(size)
            mask_path = getattr(sample, "mask_path", "")
            if isinstance(mask_path, str | Path) and str(mask_path):
                mask_size = _read(mask_path, "mask").size
                if mask_size != size:
                    msg = (
                        f"Mask {mask_path} is {mask_size[0]}x{mask_size[1]} (width x height) but its image "
                        f"{sample.image_path} is {size[0]}x{size[1]}: a mask must have the size of its image."
                    )
                    raise SmaiInputError(msg)
    sizes += [check_image_file(path) for path in getattr(dataset, "image_filenames", None) or ()]
    return min(sizes, key=lambda size: size[0] * size[1], default=None)


def check_dataloaders(dataloaders: DataLoader | Iterable[DataLoader] | None, split: str) -> tuple[int, int] | None:
    """Run :func:`check_dataset` on the dataset of each data loader.

    Args:
        dataloaders (DataLoader | Iterable[DataLoader] | None): One loader, several, or ``None``.
        split (str): Name of the split, for the messages.

    Returns:
        tuple[int, int] | None: Width and height of the smallest image (by area), if any.

    """
    loaders = [] if dataloaders is None else [dataloaders] if isinstance(dataloaders, DataLoader) else dataloaders
    datasets = [loader.dataset for loader in loaders if getattr(loader, "dataset", None) is not None]
    sizes = [size for size in (check_dataset(dataset, split) for dataset in datasets) if size is not None]
    return min(sizes, key=lambda size: size[0] * size[1], default=None)


def _files(folders: Iterable[Path]) -> list[Path]:
    """Every path under ``folders``, listed once for all the layout checks."""
    return sorted(path for folder in folders for path in folder.rglob("*"))


def _images(files: Iterable[Path], extensions: Iterable[str]) -> list[Path]:
    wanted = {extension.lower() for extension in extensions}
    return [path for path in files if path.suffix.lower() in wanted]


def _refuse_unmatched(images: list[Path], masks: list[Path], where: str) -> None:
    """Refuse defective images that have no mask (anomalib pairs them by a stem the mask's contains)."""
    mask_stems = [mask.stem for mask in masks]
    unmatched = [image for image in images if not any(image.stem in stem for stem in mask_stems)]
    if unmatched:
        msg = (
            f"{len(unmatched)} defective test image(s) have no mask {where}: {listing(unmatched)}. "
            "Every defective image needs a mask to compute pixel metrics: add the masks, or move the images "
            "out of the dataset."
        )
        raise SmaiInputError(msg)


def _refuse_broken_links(files: Iterable[Path]) -> None:
    broken = [path for path in files if path.is_symlink() and not path.exists()]
    if broken:
        msg = (
            f"{len(broken)} broken symbolic link(s) in the dataset: {listing(broken)}. "
            "Remove them or restore their targets."
        )
        raise SmaiInputError(msg)


def _read_as_defective(folder: Path, image: Path) -> bool:
    """Whether anomalib's MVTecAD layout would take ``image`` for a defective image it cannot read.

    anomalib reads the last three parts of every PNG's path as ``<split>/<label>/<name>`` and
    rebuilds the path from them: a label other than ``good`` marks a defective image, which
    needs a mask (only ``test/<defect>/`` images get one; elsewhere anomalib fails with a
    nameless ``TypeError``), and a used split (``train``, ``test``, ``ground_truth``) deeper or
    shallower than ``<category>/<split>/<label>/`` leads to a path that does not exist. Images
    labelled ``good`` in other splits (MVTec 3D-AD's ``validation/good``) are read and left out
    of every split anomalib uses: harmless.
    """
    split, label = image.parts[-3], image.parts[-2]
    used = {"train", "test", "ground_truth"}
    if split not in used:
        return label != "good"
    standard = len(image.relative_to(folder).parts) == 3
    return not standard or (split == "train" and label != "good")


def _refuse_stray_images(folder: Path, images: list[Path]) -> None:
    """Refuse PNGs that anomalib's MVTecAD layout would misread (see :func:`_read_as_defective`)."""
    stray = [path for path in images if _read_as_defective(folder, path)]
    if stray:
        msg = (
            f"{len(stray)} image(s) in {folder} are not in train/good/, test/<defect>/, ground_truth/<defect>/ "
            f"or a <folder>/good/ that anomalib leaves out: {listing(stray)}. anomalib's MVTecAD layout reads "
            "every .png under the category folder as <split>/<label>/<name> and would take them for defective "
            "images without masks, and fail: move them out of the folder (or into a folder named good, e.g. "
            "validation/good, which anomalib ignores)."
        )
        raise SmaiInputError(msg)


def check_layout(datamodule: object) -> None:
    """Refuse data folders that anomalib's MVTecAD and Folder data modules would fail on unclearly.

    An MVTecAD category folder that does not exist is refused when the category is not one of
    MVTec AD's (anomalib would try to download it); for one of MVTec AD's a warning says that
    anomalib downloads it now (which needs internet). A defective test image without a mask is
    refused with its path, and so are a broken symbolic link (anomalib would report "missing
    file path(s)" without a name) and, for MVTecAD, a PNG that anomalib would take for a
    defective image without a mask and fail on with a ``TypeError`` (see
    :func:`_read_as_defective`); images in other splits' ``good`` folders (``validation/good``),
    which anomalib leaves out, are accepted. Other data modules are left alone.

    Args:
        datamodule (object): The trainer's data module (or ``None``).

    Raises:
        SmaiInputError: If the category folder is missing and cannot be downloaded, if a
            defective test image has no mask, if a symbolic link is broken, or if an MVTecAD
            image lies outside the layout's folders.

    """
    from anomalib.data import Folder, MVTecAD
    from anomalib.data.datasets.image.mvtecad import CATEGORIES
    from torchvision.datasets.folder import IMG_EXTENSIONS  # what anomalib's Folder reads by default

    if isinstance(datamodule, MVTecAD):
        root, category = Path(datamodule.root), datamodule.category
        folder = root / category
        if not folder.is_dir():
            found = sorted(path.name for path in root.iterdir() if path.is_dir()) if root.is_dir() else []
            holds = f"{root} holds {', '.join(found)}" if found else f"{root} holds no category folders"
            if category not in CATEGORIES:
                msg = (
                    f"No dataset folder {folder} ({holds}), and '{category}' is not an MVTec AD category that "
                    "anomalib could download: check data.root and data.category (the training images belong "
                    "in <root>/<category>/train/good)."
                )
                raise SmaiInputError(msg)
            warnings.warn(
                f"No dataset folder {folder} ({holds}): anomalib downloads MVTec AD into {root} now, which needs "
                "internet. If the images are elsewhere, set data.root (images in <root>/<category>/train/good).",
                stacklevel=2,
            )
            return
        files = _files([folder])
        images = _images(files, MVTEC_EXTENSIONS)
        _refuse_broken_links(files)
        _refuse_stray_images(folder, images)  # from here on every image is <split>/<label>/<name>
        for defect in sorted(path for path in (folder / "test").glob("*") if path.is_dir() and path.name != "good"):
            masks = folder / "ground_truth" / defect.name
            _refuse_unmatched(
                [path for path in images if path.parent == defect],
                [path for path in images if path.parent == masks],
                f"in {masks}",
            )
    elif isinstance(datamodule, Folder):

        def folders(paths: str | Path | Iterable[str | Path] | None) -> list[Path]:
            paths = [] if paths is None else [paths] if isinstance(paths, str | Path) else list(paths)
            return [Path(datamodule.root or "") / path for path in paths]  # absolute paths stay absolute

        defective_folders, mask_folders = folders(datamodule.abnormal_dir), folders(datamodule.mask_dir)
        defective, masks = _files(defective_folders), _files(mask_folders)
        normal = _files(folders(datamodule.normal_dir) + folders(datamodule.normal_test_dir))
        _refuse_broken_links(normal + defective + masks)
        if defective_folders and mask_folders:
            extensions = datamodule.extensions or IMG_EXTENSIONS
            where = f"in {', '.join(map(str, mask_folders))}"
            _refuse_unmatched(_images(defective, extensions), _images(masks, extensions), where)


class SmaiDataChecksMixin:
    """Data hooks of :class:`~smai_plugin.Smai`: the checks above at the moments Lightning allows.

    Mixed in before ``AnomalibModule``; reads the Lightning model's ``trainer`` and ``input_size``.
    """

    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        """Anomalib's component callbacks; first checks the data folders (see :func:`check_layout`).

        Lightning calls this hook before the data module's ``prepare_data`` (which downloads)
        and ``setup`` (which reads the folders), so it is SMAI's first chance to check them.
        """
        check_layout(getattr(self._trainer, "datamodule", None))
        return super().configure_callbacks()

    def on_fit_start(self) -> None:
        """Check the training and validation files before training."""
        datamodule = self.trainer.datamodule
        for split in ("train", "val"):
            dataset = getattr(datamodule, f"{split}_data", None)
            if dataset is not None:
                self._warn_if_upscaled(check_dataset(dataset, split), split)

    def check_scored_files(self, split: str) -> None:
        """Check the files of the trainer's ``test`` or ``predict`` data loaders."""
        smallest = check_dataloaders(getattr(self.trainer, f"{split}_dataloaders"), split)
        self._warn_if_upscaled(smallest, split)

    def _warn_if_upscaled(self, smallest: tuple[int, int] | None, split: str) -> None:
        """Warn when the pre-processor enlarges an image more than ``MAX_UPSCALING`` times per side."""
        size = self.input_size
        if smallest is None or size is None:
            return
        factor = max(size[0] / smallest[1], size[1] / smallest[0])
        if factor > MAX_UPSCALING:
            rank_zero_warn(
                f"The smallest {split} image is {smallest[0]}x{smallest[1]} (width x height); resized to "
                f"{size[1]}x{size[0]} it is {factor:.0f} times larger per side and holds little detail to inpaint. "
                "Use larger images, or a smaller image_size."
            )

    @staticmethod
    def check_finite(batch: Batch) -> None:
        """Refuse NaN or infinite pixels; a check on values, so it lives outside the exported graph."""
        finite = torch.isfinite(batch.image).flatten(1).all(1)
        if not finite.all():
            bad = (~finite).nonzero().flatten().tolist()
            paths = getattr(batch, "image_path", None)
            names = [str(paths[index]) for index in bad] if paths else [f"batch index {index}" for index in bad]
            msg = f"Input images contain NaN or infinite values: {', '.join(names)}. Check the data and the transforms."
            raise SmaiInputError(msg)
