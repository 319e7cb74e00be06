"""Shared fixtures: the real images bundled in ``sample_data/``, shrunk so tests run in seconds.

The suite reads nothing outside the repository, so it runs from a bare clone.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"


def sample_paths(category: str, split: str) -> list[Path]:
    """The bundled PNG images of ``category`` under ``split`` (e.g. ``"train"``, ``"test/colour"``), sorted."""
    return sorted((SAMPLE_DATA / category / split).rglob("*.png"))


def real_image(category: str, split: str, index: int = 0, size: int | None = None) -> np.ndarray:
    """An RGB image (H, W, 3) uint8 from the bundled sample data, optionally resized to a square."""
    image = Image.open(sample_paths(category, split)[index]).convert("RGB")
    if size is not None:
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image)


def make_tiny_mvtec(
    root: Path, category: str = "hazelnut_toy", size: int = 64, n_train: int = 8, n_good: int = 2, n_defect: int = 3
) -> Path:
    """Copy a few bundled images (and their masks) of a category into ``root``, resized to ``size``."""
    source = SAMPLE_DATA / category
    target = root / category

    def copy(path: Path, out: Path, resample: int) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).resize((size, size), resample).save(out)

    for path in sorted((source / "train" / "good").glob("*.png"))[:n_train]:
        copy(path, target / "train" / "good" / path.name, Image.BICUBIC)
    for path in sorted((source / "test" / "good").glob("*.png"))[:n_good]:
        copy(path, target / "test" / "good" / path.name, Image.BICUBIC)
    defect_dir = next(d for d in sorted((source / "test").iterdir()) if d.name != "good")
    for path in sorted(defect_dir.glob("*.png"))[:n_defect]:
        copy(path, target / "test" / defect_dir.name / path.name, Image.BICUBIC)
        mask = source / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
        copy(mask, target / "ground_truth" / defect_dir.name / mask.name, Image.NEAREST)
    return root


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec-layout root holding a 64x64 ``hazelnut_toy`` with 8 train and 5 test real images."""
    return make_tiny_mvtec(tmp_path_factory.mktemp("tiny_mvtec"))


TINY_MODEL_ARGS = {
    "image_size": (64, 64),
    "n_superpixels": 9,
    "n_masked": 2,
    "base_channels": 8,
    "discriminator_channels": 8,
    "max_steps": 2,
    "slic_iterations": 3,
}
