"""SMAI's reconstruction: what each superpixel should have looked like, in Python, in pictures and in the benchmark."""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from PIL import Image
from torch import nn

from smai_plugin import Smai, SmaiModel, SmaiVisualizer
from smai_plugin.anomaly_map import AnomalyMapGenerator
from smai_plugin.batch import SmaiImageBatch
from smai_plugin.visualizer import reconstruction_picture

from .conftest import TINY_MODEL_ARGS, sample_paths

GREY = 0.25  # what the inpainter below paints, in PEN-Net's [-1, 1]


class GreyInpainter(nn.Module):
    """Paints every pixel of its input grey: the reconstruction is grey exactly where a pass's hole was."""

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, list]:
        return torch.full_like(images, GREY), []


def quadrant_holes() -> torch.Tensor:
    """Two passes on a 64x64 image: the top-left and the bottom-right quadrant; the rest is never masked."""
    holes = torch.zeros(1, 2, 64, 64)
    holes[0, 0, :32, :32] = 1
    holes[0, 1, 32:, 32:] = 1
    return holes


@pytest.mark.parametrize(
    ("comparison", "window"), [("per_pass", None), ("reconstruction", None), ("reconstruction", (32, 32))]
)
def test_reconstruction_is_the_inpainting_in_the_holes_and_the_image_elsewhere(
    comparison: str, window: tuple[int, int] | None
) -> None:
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    holes = quadrant_holes()
    scorer = AnomalyMapGenerator("l2", comparison=comparison, passes_per_batch=1, sigma=0)
    maps, reconstruction = scorer.compare(GreyInpainter(), image, holes, window, reconstruct=True)
    inpainted = holes.sum(1, keepdim=True).bool().expand_as(image)
    assert torch.all(reconstruction[inpainted] == GREY)
    assert torch.equal(reconstruction[~inpainted], image[~inpainted])
    torch.testing.assert_close(maps, scorer(GreyInpainter(), image, holes, window))  # forward's maps, unchanged
    if comparison == "per_pass":  # assembled only on request there
        assert scorer.compare(GreyInpainter(), image, holes, window)[1] is None


def test_windowed_reconstruction_keeps_the_image_outside_every_window() -> None:
    """A hole wider than its 16x16 window: only the window's part of it is inpainted."""
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    holes = torch.zeros(1, 1, 64, 64)
    holes[0, 0, :, :40] = 1
    scorer = AnomalyMapGenerator("msgms", comparison="reconstruction", sigma=0)
    _, reconstruction = scorer.compare(GreyInpainter(), image, holes, window=(16, 16))
    changed = (reconstruction != image).any(1)[0]
    assert changed.sum() == 16 * 16
    assert bool(holes[0, 0][changed].all())


@pytest.mark.parametrize(
    "settings",
    [
        {"score_measure": ["msgms", "memory"], "comparison": "reconstruction", "inpaint_size": (64, 64)},
        {"score_measure": "ssim", "comparison": "per_pass", "scoring": "leave_one_out"},
    ],
)
def test_model_returns_the_reconstruction_at_the_images_size_and_range(settings: dict) -> None:
    torch.manual_seed(0)
    calibration = "score" if isinstance(settings["score_measure"], list) else "none"
    model = SmaiModel(n_superpixels=9, base_channels=8, slic_iterations=3, calibration=calibration, **settings).eval()
    images = torch.rand(2, 3, 128, 128)
    if calibration == "score":
        model.calibrate([images])
    with torch.no_grad():
        plain = model(images)
        output = model(images, reconstruct=True)
    assert output.reconstruction.shape == images.shape
    assert float(output.reconstruction.min()) >= 0
    assert float(output.reconstruction.max()) <= 1
    assert not torch.allclose(output.reconstruction, images, atol=0.05)  # the random network repainted it
    # The prediction itself does not change with it.
    assert torch.equal(plain.pred_score, output.pred_score)
    assert torch.equal(plain.anomaly_map, output.anomaly_map)


def test_a_model_without_inpainting_has_no_reconstruction() -> None:
    model = SmaiModel(score_measure="memory", calibration="score", base_channels=8).eval()
    images = torch.rand(2, 3, 64, 64)
    model.calibrate([images])
    with torch.no_grad():
        assert model(images, reconstruct=True).reconstruction is None


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, tiny_root: Path) -> tuple[Smai, Engine]:
    torch.manual_seed(0)
    model = Smai(**TINY_MODEL_ARGS)
    engine = Engine(default_root_dir=tmp_path_factory.mktemp("fit"), accelerator="cpu", devices=1)
    engine.fit(model=model, datamodule=MVTecAD(root=tiny_root, category="hazelnut_toy", num_workers=0))
    return model, engine


SIZE = 256  # anomalib's panel size


def second_panel(picture: Image.Image) -> np.ndarray:
    """The second panel's lower half (its upper left holds the panel's title)."""
    return np.asarray(picture.crop((SIZE, SIZE // 2, 2 * SIZE, SIZE)), dtype=np.float32)


@pytest.mark.slow
def test_engine_predict_on_a_folder_draws_the_reconstruction(fitted: tuple[Smai, Engine], tmp_path: Path) -> None:
    model, engine = fitted
    folder = tmp_path / "to_inspect"
    folder.mkdir()
    for path in [*sample_paths("hazelnut_toy", "test/colour")[:2], sample_paths("hazelnut_toy", "test/good")[0]]:
        Image.open(path).save(folder / path.name)
    model.visualizer = SmaiVisualizer(output_dir=tmp_path / "pictures")
    reconstructions = {}
    for batch in engine.predict(model=model, data_path=folder):
        assert isinstance(batch, SmaiImageBatch)
        assert batch.reconstruction.shape == batch.image.shape
        assert batch.reconstruction.shape[-2:] == (64, 64)
        assert float(batch.reconstruction.min()) >= 0
        assert float(batch.reconstruction.max()) <= 1
        for item in batch:  # items carry it too
            reconstructions[Path(item.image_path).name] = item.reconstruction
    pictures = sorted((tmp_path / "pictures").rglob("*.png"))
    assert len(pictures) == len(reconstructions) == 3
    for path in pictures:
        picture = Image.open(path)
        # image | reconstruction | image + anomaly map | image + predicted mask (a folder has no ground truth)
        assert picture.size == (4 * SIZE, SIZE)
        drawn = np.asarray(reconstruction_picture(reconstructions[path.name]).resize((SIZE, SIZE)), dtype=np.float32)
        assert np.abs(second_panel(picture) - drawn[SIZE // 2 :]).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("reconstruction", [True, False])
def test_engine_test_pictures_show_the_reconstruction_unless_turned_off(
    fitted: tuple[Smai, Engine], tiny_root: Path, tmp_path: Path, reconstruction: bool
) -> None:
    model, engine = fitted
    model.visualizer = SmaiVisualizer(reconstruction=reconstruction, output_dir=tmp_path)
    engine.test(model=model, datamodule=MVTecAD(root=tiny_root, category="hazelnut_toy", num_workers=0))
    pictures = sorted(tmp_path.rglob("*.png"))
    assert pictures
    # image | [reconstruction] | ground truth | image + anomaly map | image + predicted mask
    assert {Image.open(path).size for path in pictures} == {((4 + reconstruction) * SIZE, SIZE)}


def test_the_reconstruction_survives_items_copies_and_numpy() -> None:
    from anomalib.data import ImageBatch

    from smai_plugin.batch import with_reconstruction

    batch = ImageBatch(image=torch.rand(2, 3, 8, 8), image_path=["a.png", "b.png"])
    assert with_reconstruction(batch) is batch  # in place: anomalib's callbacks hold this object
    reconstruction = torch.rand(2, 3, 8, 8)
    batch.update(reconstruction=reconstruction, pred_score=torch.rand(2))
    assert torch.equal(batch.update(in_place=False, pred_score=torch.zeros(2)).reconstruction, reconstruction)
    assert torch.equal(list(batch)[1].reconstruction, reconstruction[1])
    as_numpy = batch.to_numpy()
    np.testing.assert_array_equal(as_numpy.reconstruction, reconstruction.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(next(iter(as_numpy)).reconstruction, reconstruction[0].permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="3 colour channels"):
        batch.update(reconstruction=torch.rand(2, 1, 8, 8))
