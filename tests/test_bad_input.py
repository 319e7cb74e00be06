"""Bad input is refused with a message a user can act on, never a deep crash or a silent wrong answer.

Image files are real images from the bundled sample data, written in other formats with Pillow.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder, MVTecAD
from anomalib.data.datasets import MVTecADDataset
from anomalib.engine import Engine
from anomalib.pre_processing import PreProcessor
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import Resize

from smai_plugin import Smai, SmaiInputError
from smai_plugin.data_checks import check_layout
from smai_plugin.superpixel import SuperpixelMasker

from .conftest import TINY_MODEL_ARGS, make_tiny_mvtec

CATEGORY = "hazelnut_toy"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fresh tiny MVTec copy that a test may damage."""
    return make_tiny_mvtec(tmp_path / "data", n_train=4, n_good=1, n_defect=2)


def datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category=CATEGORY, train_batch_size=4, eval_batch_size=3, num_workers=0, seed=0)


def engine(tmp_path: Path) -> Engine:
    return Engine(default_root_dir=tmp_path / "out", accelerator="cpu", devices=1, logger=False)


def tiny_model(**kwargs) -> Smai:
    return Smai(**{**TINY_MODEL_ARGS, "max_steps": 1, **kwargs}, visualizer=False)


def train_images(root: Path) -> list[Path]:
    return sorted((root / CATEGORY / "train" / "good").glob("*.png"))


# Configuration: values test_engine.py::test_invalid_config_values_are_refused does not cover.
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": (100, 100)}, r"height and width that are positive multiples of 64 .* got 100x100"),
        ({"image_size": (0, 64)}, "positive multiples of 64 .* got 0x64"),
        ({"image_size": (64, 64, 64)}, r"image_size must be \(height, width\)"),
        ({"image_size": (64, 64), "n_superpixels": 5000}, "n_superpixels .5000. exceeds the 4096 pixels"),
        ({"discriminator_channels": -8}, "discriminator_channels must be a whole number of at least 1"),
        ({"slic_iterations": 0}, "slic_iterations must be a whole number of at least 1"),
        ({"compactness": -1.0}, "compactness must be positive"),
        ({"passes_per_batch": 0}, "passes_per_batch must be a whole number of at least 1"),
        ({"hole_weight": -1.0}, "weights must be non-negative"),
        ({"sigma": -1.0}, "sigma must be non-negative"),
    ],
)
def test_invalid_config_is_refused_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Smai(**kwargs)


def test_more_superpixels_than_pixels_is_refused_at_run_time() -> None:
    # With a custom pre-processor the image size is only known from the batch.
    with pytest.raises(ValueError, match=r"n_superpixels \(5000\) exceeds the 4096 pixels of 64x64"):
        SuperpixelMasker(5000)(torch.rand(1, 3, 64, 64))
    assert SuperpixelMasker(4096)(torch.rand(1, 3, 64, 64)).shape == (1, 4096, 64, 64)


def test_window_larger_than_the_image_warns() -> None:
    with pytest.warns(UserWarning, match="window_size 128 is larger than the"):
        Smai(image_size=64, n_superpixels=9, n_masked=2, window_size=128)
    with pytest.warns(UserWarning, match=r"window_size 320 is larger than the \(256, 256\) images"):
        Smai(window_size=320)  # the default image size is named, not None


@pytest.mark.slow
def test_tiny_images_that_get_upscaled_warn(root: Path, tmp_path: Path) -> None:
    path = train_images(root)[0]
    Image.open(path).resize((8, 8)).save(path)  # 8x8, resized to 64x64: 8 times larger per side
    with pytest.warns(UserWarning, match=r"smallest train image is 8x8 .* 8 times larger per side"):
        engine(tmp_path).fit(tiny_model(), datamodule=datamodule(root))


@pytest.mark.slow
def test_size_not_multiple_of_64_from_custom_pre_processor(root: Path, tmp_path: Path) -> None:
    model = tiny_model(pre_processor=PreProcessor(transform=Resize((96, 96))))
    with pytest.raises(ValueError, match=r"multiples of 64 .* got 96x96"):
        engine(tmp_path).fit(model, datamodule=datamodule(root))


# Image formats: what anomalib's loading does with them.
def test_grayscale_rgba_and_16bit_rgb_are_converted(root: Path) -> None:
    """anomalib converts these to 8-bit RGB correctly; SMAI accepts them."""
    paths = train_images(root)
    rgb = [np.asarray(Image.open(path).convert("RGB")) for path in paths[:3]]
    Image.open(paths[0]).convert("L").save(paths[0])
    Image.open(paths[1]).convert("RGBA").save(paths[1])
    # 16-bit RGB PNG (48 bits per pixel), written with OpenCV since Pillow cannot write it.
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(paths[2]), rgb[2][..., ::-1].astype(np.uint16) * 257)
    assert Image.open(paths[2]).mode == "RGB"  # Pillow reads it as 8-bit RGB

    dataset = MVTecADDataset(root=root, category=CATEGORY, split="train")
    items = {Path(item.image_path).name: item.image for item in (dataset[i] for i in range(len(dataset)))}
    gray = items[paths[0].name]
    assert gray.shape == (3, 64, 64)
    assert torch.equal(gray[0], gray[1])
    assert torch.equal(gray[0], gray[2])
    expected_gray = torch.from_numpy(np.asarray(Image.fromarray(rgb[0]).convert("L"))) / 255
    torch.testing.assert_close(gray[0], expected_gray)
    for index in (1, 2):  # alpha dropped; 16 bits down to 8
        expected = torch.from_numpy(rgb[index]).permute(2, 0, 1) / 255
        torch.testing.assert_close(items[paths[index].name], expected, atol=1 / 255, rtol=0)


@pytest.mark.slow
def test_grayscale_and_rgba_train(root: Path, tmp_path: Path) -> None:
    paths = train_images(root)
    Image.open(paths[0]).convert("L").save(paths[0])
    Image.open(paths[1]).convert("RGBA").save(paths[1])
    trainer = engine(tmp_path)
    trainer.fit(tiny_model(), datamodule=datamodule(root))
    assert trainer.trainer.global_step == 1  # one iteration: generator and discriminator step


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_high_bit_depth_grayscale_is_refused(root: Path, tmp_path: Path, mode: str) -> None:
    # anomalib's convert("RGB") clips these to [0, 255]: a white image, a silent wrong answer.
    png = train_images(root)[1]
    gray = np.asarray(Image.open(png).convert("L"))
    if mode == "I;16":  # 16-bit PNG, in an MVTecAD folder
        path, data = png, gray.astype(np.uint16) * 257
        module = datamodule(root)
    else:  # 32-bit float TIFF, which the Folder datamodule reads
        path, data = png.with_suffix(".tiff"), gray.astype(np.float32) / 255
        png.unlink()
        module = Folder(
            name="tiff", root=root / CATEGORY, normal_dir="train/good", abnormal_dir="test/colour", num_workers=0
        )
    Image.fromarray(data).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(ValueError, match=rf"Image {path} has '{mode}' pixels .*Convert it to 8 bits"):
        engine(tmp_path).fit(tiny_model(), datamodule=module)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "empty_file"])
def test_corrupt_image_file_is_named(root: Path, tmp_path: Path, damage: str) -> None:
    path = train_images(root)[2]
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "not_an_image": b"hello", "empty_file": b""}[damage])
    with pytest.raises(ValueError, match=rf"Cannot read image file {path} .*truncated or corrupt"):
        engine(tmp_path).fit(tiny_model(), datamodule=datamodule(root))


@pytest.mark.slow
def test_corrupt_test_image_is_named_before_scoring(root: Path, tmp_path: Path) -> None:
    path = sorted((root / CATEGORY / "test").rglob("*.png"))[-1]
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=rf"Cannot read image file {path}"):
        engine(tmp_path).test(tiny_model(), datamodule=datamodule(root))


@pytest.mark.slow
@pytest.mark.parametrize("mask_size", [(64, 32), (128, 128)])
def test_mask_size_mismatch_is_refused(root: Path, tmp_path: Path, mask_size: tuple[int, int]) -> None:
    # Without the check the pre-processor stretches the mask to the image silently.
    mask = sorted((root / CATEGORY / "ground_truth").rglob("*.png"))[0]
    Image.open(mask).resize(mask_size, Image.NEAREST).save(mask)
    with pytest.raises(ValueError, match=rf"Mask {mask} is {mask_size[0]}x{mask_size[1]} .* is 64x64"):
        engine(tmp_path).test(tiny_model(), datamodule=datamodule(root))


@pytest.mark.slow
def test_empty_training_folder(root: Path, tmp_path: Path) -> None:
    for path in train_images(root):
        path.unlink()
    # MVTecAD finds no training images: anomalib would fail in torch's sampler ("num_samples=0").
    with pytest.raises(ValueError, match=rf"training set is empty: no images were found in {root / CATEGORY}"):
        engine(tmp_path).fit(tiny_model(), datamodule=datamodule(root))
    # Folder already says it clearly.
    folder = Folder(name="empty", root=root / CATEGORY, normal_dir="train/good", abnormal_dir="test", num_workers=0)
    with pytest.raises(RuntimeError, match=r"Found 0 .*NORMAL images in .*train/good"):
        engine(tmp_path).fit(tiny_model(), datamodule=folder)


class Poisoned(Dataset):
    """An anomalib dataset whose item ``index`` gets a non-finite pixel (as a broken transform would)."""

    def __init__(self, dataset: Dataset, index: int, value: float) -> None:
        self.dataset, self.index, self.value = dataset, index, value

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if index == self.index:
            item.image[:, 10, 10] = self.value
        return item


@pytest.mark.slow
@pytest.mark.parametrize(("split", "value"), [("train", float("nan")), ("test", float("inf"))])
def test_non_finite_pixels_are_named(root: Path, tmp_path: Path, split: str, value: float) -> None:
    dataset = MVTecADDataset(root=root, category=CATEGORY, split=split)
    poisoned = Poisoned(dataset, index=1, value=value)
    loader = DataLoader(poisoned, batch_size=len(dataset), collate_fn=dataset.collate_fn)
    bad = dataset.samples.image_path.iloc[1]
    others = [path for path in dataset.samples.image_path if path != bad]
    run = engine(tmp_path).fit if split == "train" else engine(tmp_path).test
    with pytest.raises(ValueError, match="NaN or infinite values") as error:
        run(tiny_model(calibration="none", score_measure="ssim"), loader)  # untrained: no calibration
    assert bad in str(error.value)
    assert not any(path in str(error.value) for path in others)  # names only the bad image


@pytest.mark.slow
def test_corrupt_file_in_predict_folder_is_named(root: Path, tmp_path: Path) -> None:
    folder = root / CATEGORY / "test" / "good"
    path = sorted(folder.glob("*.png"))[0]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"Cannot read image file {path}"):
        engine(tmp_path).predict(tiny_model(), data_path=folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of a one-step SMAI."""
    tmp_path = tmp_path_factory.mktemp("checkpoint")
    root = make_tiny_mvtec(tmp_path / "data", n_train=4, n_good=1, n_defect=2)
    trainer = engine(tmp_path)
    trainer.fit(model=tiny_model(), datamodule=datamodule(root))
    return Path(trainer.trainer.checkpoint_callback.best_model_path)


def damaged_copy(checkpoint: Path, tmp_path: Path, damage: str) -> Path:
    data = bytearray(checkpoint.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "bytes_flipped":  # inside a tensor's storage: the zip directory is intact
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(byte ^ 0xFF for byte in data[middle : middle + 64])
    else:
        data = bytearray()
    path = tmp_path / f"{damage}.ckpt"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "bytes_flipped", "empty"])
def test_damaged_checkpoint_is_named(checkpoint: Path, tmp_path: Path, damage: str) -> None:
    path = damaged_copy(checkpoint, tmp_path, damage)
    with pytest.raises(ValueError, match=rf"The checkpoint {path}.*(not a complete|damaged).*train again"):
        Smai.load_from_checkpoint(path)
    root = make_tiny_mvtec(tmp_path / "data", n_train=4, n_good=1, n_defect=2)
    with pytest.raises(ValueError, match=rf"The checkpoint {path}"):
        engine(tmp_path).test(model=tiny_model(), datamodule=datamodule(root), ckpt_path=path)
    assert Smai.load_from_checkpoint(checkpoint).model.masker.n_superpixels == TINY_MODEL_ARGS["n_superpixels"]


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"No checkpoint file at {tmp_path / 'none.ckpt'}"):
        Smai.load_from_checkpoint(tmp_path / "none.ckpt")


@pytest.mark.slow
def test_training_files_the_layout_skips_are_named(root: Path, tmp_path: Path) -> None:
    """JPEGs in train/good: anomalib's MVTecAD reads PNG only; all skipped refuses, some skipped warns."""
    images = train_images(root)

    def to_jpeg(paths: list[Path]) -> None:
        for path in paths:
            Image.open(path).save(path.with_suffix(".jpg"))
            path.unlink()

    to_jpeg(images[2:])
    with pytest.warns(UserWarning, match=r"skips 2 file\(s\) in .*train/good \(.*\.jpg.*\): it reads .png files only"):
        engine(tmp_path).fit(model=tiny_model(), datamodule=datamodule(root))
    to_jpeg(images[:2])
    with pytest.raises(ValueError, match=r"training set is empty.*skips 4 file\(s\)"):
        engine(tmp_path).fit(model=tiny_model(), datamodule=datamodule(root))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["mvtec", "folder"])
def test_defective_image_without_mask_is_named(root: Path, tmp_path: Path, layout: str) -> None:
    """anomalib itself fails in pandas or NumPy naming no file; SMAI checks first, from configure_callbacks."""
    image = sorted((root / CATEGORY / "test").glob("[!g]*/*.png"))[0]
    mask = root / CATEGORY / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
    mask.unlink()
    if layout == "mvtec":
        data = datamodule(root)
    else:
        data = Folder(
            name="no_mask",
            root=root / CATEGORY,
            normal_dir="train/good",
            abnormal_dir=f"test/{image.parent.name}",
            mask_dir=f"ground_truth/{image.parent.name}",
            num_workers=0,
        )
    with pytest.raises(SmaiInputError, match=rf"1 defective test image\(s\) have no mask in .*: {image}\. Every"):
        engine(tmp_path).fit(tiny_model(), datamodule=data)


def test_missing_category_is_refused_before_a_download(tmp_path: Path) -> None:
    """A category MVTec AD does not have cannot be downloaded: refused, and nothing is created."""
    missing_root = tmp_path / "no_such_root"
    data = MVTecAD(root=missing_root, category="botle", num_workers=0)
    with pytest.raises(SmaiInputError, match=rf"No dataset folder {missing_root / 'botle'} .*not an MVTec AD category"):
        engine(tmp_path).fit(tiny_model(), datamodule=data)
    assert not missing_root.exists()
    # One of MVTec AD's categories is downloaded by anomalib: SMAI says so first (not run here: offline).
    with pytest.warns(UserWarning, match=r"anomalib downloads MVTec AD into .*no_such_root now, which needs internet"):
        check_layout(MVTecAD(root=missing_root, category="bottle"))


@pytest.mark.slow
def test_broken_symbolic_link_is_named(root: Path, tmp_path: Path) -> None:
    """anomalib alone reports "missing file path(s) in samples" without naming the link."""
    link = root / CATEGORY / "train" / "good" / "zz_link.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(SmaiInputError, match=rf"1 broken symbolic link\(s\) in the dataset: {link}\. Remove them"):
        engine(tmp_path).fit(tiny_model(), datamodule=datamodule(root))


@pytest.mark.slow
@pytest.mark.parametrize(
    "where", ["thumbnails/preview.png", "validation/crack/x.png", "train/good/nested/x.png", "train/crack/x.png"]
)
def test_image_outside_the_mvtec_folders_is_named(root: Path, tmp_path: Path, where: str) -> None:
    """anomalib alone reads it as a defective image without a mask and fails with a nameless TypeError."""
    stray = root / CATEGORY / where
    stray.parent.mkdir(parents=True, exist_ok=True)
    train_images(root)[0].rename(stray)
    with pytest.raises(
        SmaiInputError, match=rf"1 image\(s\) in {root / CATEGORY} are not in train/good/.*: {stray}\. "
    ):
        engine(tmp_path).fit(tiny_model(), datamodule=datamodule(root))
