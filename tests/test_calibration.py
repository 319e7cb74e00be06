"""Calibration against normal residuals: what it is fitted on, where it lives, when it is redone."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from PIL import Image

from smai_plugin import Smai
from smai_plugin.calibration import NormalStatistics
from smai_plugin.torch_model import SmaiModel

from .conftest import TINY_MODEL_ARGS

pytestmark = pytest.mark.slow


def test_statistics_are_mean_and_floored_spread_of_normal_maps() -> None:
    torch.manual_seed(0)
    maps = torch.rand(10, 2, 8, 8) * torch.linspace(0.1, 1, 64).reshape(1, 1, 8, 8)
    statistics = NormalStatistics(floor_quantile=0.5)
    statistics.fit(maps.split(3))  # batches of 3, 3, 3, 1
    torch.testing.assert_close(statistics.mean, maps.mean(0, keepdim=True))
    spread = maps.std(0, keepdim=True)
    floor = spread.flatten(2).quantile(0.5, dim=2)[..., None, None]  # per measure, over the 64 pixels
    assert (statistics.spread > spread + 1e-6).sum() == pytest.approx(64, abs=2)  # half the pixels lifted to the floor
    torch.testing.assert_close(statistics.spread, torch.maximum(spread, floor))
    torch.testing.assert_close(statistics(maps), (maps - statistics.mean) / statistics.spread)
    # The normal level: every 4th pixel each way (4 of the 64 here) of the 10 maps; the 99.9% quantile of
    # 40 values is the largest. Each measure's map is scaled by its level.
    sampled = maps[..., ::4, ::4].transpose(0, 1).flatten(1)
    torch.testing.assert_close(statistics.level.flatten(), sampled.amax(dim=1))
    torch.testing.assert_close(statistics.scale(maps), maps / sampled.amax(dim=1).reshape(1, 2, 1, 1))
    # The statistics travel in state dicts, into a module that has none yet.
    fresh = NormalStatistics()
    fresh.load_state_dict(statistics.state_dict())
    torch.testing.assert_close(fresh(maps), statistics(maps))
    with pytest.raises(ValueError, match="Maps of 16x16 pixels cannot be calibrated with statistics fitted on 8x8"):
        statistics(torch.rand(1, 2, 16, 16))
    with pytest.raises(ValueError, match=r"fitted for 2 score measure\(s\), but the model now scores with 3"):
        statistics(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="not fitted"):
        NormalStatistics()(maps)
    with pytest.raises(ValueError, match="at least 2"):
        NormalStatistics().fit([maps[:1]])


def test_calibration_modes_use_the_statistics_as_documented() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64)
    args = {"n_superpixels": 9, "base_channels": 8, "score_measure": ["msgms", "l2"], "comparison": "reconstruction"}
    score_mode = SmaiModel(**args, calibration="score").eval()
    map_mode = SmaiModel(**args, calibration="map").eval()
    l2_scores = SmaiModel(**args, calibration="score", image_score_measure="l2").eval()
    for model in (map_mode, l2_scores):
        model.load_state_dict(score_mode.state_dict())
    for model in (score_mode, map_mode, l2_scores):
        model.calibrate([images[:2], images[2:]])
    statistics = score_mode.normal_statistics
    with torch.no_grad():
        maps = score_mode.difference_maps(images)
        standardised = ((maps - statistics.mean) / statistics.spread).mean(1, keepdim=True)
        # Each measure on its normal level's scale (the 99.9% quantile of every 4th pixel each way), averaged.
        sampled = maps[..., ::4, ::4].transpose(0, 1).flatten(1)
        level = sampled.kthvalue(math.ceil(0.999 * sampled.shape[1]), dim=1).values.reshape(1, 2, 1, 1)
        scaled = (maps / level).mean(1, keepdim=True)
        by_score, by_map = score_mode(images), map_mode(images)
    torch.testing.assert_close(by_score.pred_score, standardised.amax(dim=(1, 2, 3)))
    torch.testing.assert_close(by_score.anomaly_map, scaled)
    torch.testing.assert_close(by_map.pred_score, standardised.amax(dim=(1, 2, 3)))
    torch.testing.assert_close(by_map.anomaly_map, standardised)
    # image_score_measure: the image score from the l2 channel's standardised map alone, the anomaly map unchanged.
    with torch.no_grad():
        by_l2 = l2_scores(images)
    l2_standardised = (maps[:, 1:] - statistics.mean[:, 1:]) / statistics.spread[:, 1:]
    torch.testing.assert_close(by_l2.pred_score, l2_standardised.amax(dim=(1, 2, 3)))
    assert not torch.allclose(by_l2.pred_score, by_score.pred_score)
    torch.testing.assert_close(by_l2.anomaly_map, by_score.anomaly_map)
    with pytest.raises(ValueError, match=r"image_score_measure \['memory'\] must be among score_measure"):
        SmaiModel(**args, calibration="score", image_score_measure="memory")
    with pytest.raises(ValueError, match="pick one measure"):
        SmaiModel(**args, calibration="none")
    with pytest.raises(ValueError, match="calibration"):
        SmaiModel(n_superpixels=9, base_channels=8, calibration="sometimes")


def test_with_the_memory_the_map_adds_what_the_inpainting_shows_beyond_its_normal_level() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64)
    model = SmaiModel(n_superpixels=9, base_channels=8, score_measure=["msgms", "memory"], calibration="score").eval()
    model.calibrate([images[:2], images[2:]])
    test = images.flip(-1) * 0.5 + torch.rand(4, 3, 64, 64) * 0.5  # images the memory has not seen
    with torch.no_grad():
        maps = model.difference_maps(test)
        output = model(test)
    scaled = maps / model.normal_statistics.level
    expected = scaled[:, 1:] + (scaled[:, :1] - 1).clamp(min=0)  # the memory's map + msgms beyond its level
    torch.testing.assert_close(output.anomaly_map, expected)
    assert (scaled[:, :1] > 1).any()  # both sides of the level occur
    assert (scaled[:, :1] < 1).any()
    standardised = (maps[:, 1:] - model.normal_statistics.mean[:, 1:]) / model.normal_statistics.spread[:, 1:]
    torch.testing.assert_close(output.pred_score, model.image_score(standardised))  # the memory ranks images


def datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="hazelnut_toy", train_batch_size=4, eval_batch_size=5, num_workers=0, seed=0)


def engine(root_dir: Path) -> Engine:
    return Engine(default_root_dir=root_dir, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)


class CalibrationSpy:
    """Records the images the torch model is calibrated on, then calibrates for real."""

    def __init__(self, model: Smai) -> None:
        self.batches: list[torch.Tensor] = []
        self._calibrate = model.model.calibrate
        model.model.calibrate = self

    def __call__(self, batches: object) -> None:
        self._calibrate(self.Recorded(self, batches))

    class Recorded:
        """The batches, recorded each time they are iterated (twice with a feature memory)."""

        def __init__(self, spy: "CalibrationSpy", batches: object) -> None:
            self.spy, self.batches = spy, batches

        def __iter__(self) -> object:
            for images in self.batches:
                self.spy.batches.append(images.clone())
                yield images


def load_images(folder: Path) -> torch.Tensor:
    arrays = [np.asarray(Image.open(path).convert("RGB")) for path in sorted(folder.rglob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def fitted(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Smai, CalibrationSpy, Path]:
    torch.manual_seed(0)
    model = Smai(**TINY_MODEL_ARGS, visualizer=False)
    spy = CalibrationSpy(model)
    trainer = engine(tmp_path_factory.mktemp("calibration"))
    trainer.fit(model, datamodule=datamodule(tiny_root))
    path = tmp_path_factory.mktemp("checkpoint") / "model.ckpt"
    trainer.trainer.save_checkpoint(path)
    return model, spy, path


def test_statistics_see_the_training_images_only(fitted: tuple[Smai, CalibrationSpy, Path], tiny_root: Path) -> None:
    model, spy, _ = fitted
    assert model.model.normal_statistics.is_fitted
    seen = torch.cat(spy.batches)
    train = load_images(tiny_root / "hazelnut_toy" / "train")
    test = load_images(tiny_root / "hazelnut_toy" / "test")
    # One calibration (8 images in batches of 5), when validation started: the default's feature
    # memory is filled from the images, then their maps are fitted.
    assert model.model.memory is not None
    assert model.model.memory.is_fitted
    assert len(spy.batches) == 4
    assert seen.shape == (2 * len(train), *train.shape[1:])
    # Each calibration image is one training image (64x64 files, so the resize is the identity),
    # and none is a test (or validation: same_as_test) image.
    matches = (seen[:, None] - train[None]).abs().flatten(2).amax(2) < 1e-3
    assert matches.sum(1).eq(1).all()
    assert matches.sum(0).eq(2).all()
    assert not ((seen[:, None] - test[None]).abs().flatten(2).amax(2) < 0.05).any()
    # The statistics are those of the training images' maps, each image's own features left out of the memory.
    model.eval()
    with torch.no_grad():
        maps = model.model.difference_maps(train, leave_out=torch.arange(len(train)))
    torch.testing.assert_close(model.model.normal_statistics.mean, maps.mean(0, keepdim=True), atol=1e-5, rtol=1e-4)


def test_calibrated_checkpoint_round_trips_without_recalibrating(
    fitted: tuple[Smai, CalibrationSpy, Path], tiny_root: Path, tmp_path: Path
) -> None:
    model, _, path = fitted
    loaded = Smai.load_from_checkpoint(path)
    for name in ("mean", "spread"):
        torch.testing.assert_close(
            getattr(loaded.model.normal_statistics, name), getattr(model.model.normal_statistics, name)
        )
    assert torch.equal(loaded.model.memory.bank, model.model.memory.bank)  # the memory came with the checkpoint
    spy = CalibrationSpy(loaded)
    predictions = engine(tmp_path).predict(loaded, datamodule=datamodule(tiny_root))
    assert spy.batches == []  # the statistics came with the checkpoint
    reference = engine(tmp_path).predict(model, datamodule=datamodule(tiny_root))
    torch.testing.assert_close(
        torch.cat([b.pred_score for b in predictions]), torch.cat([b.pred_score for b in reference])
    )


def test_other_map_settings_calibrate_again(
    fitted: tuple[Smai, CalibrationSpy, Path], tiny_root: Path, tmp_path: Path
) -> None:
    _, _, path = fitted
    loaded = Smai.load_from_checkpoint(path, score_measure="l2")  # the checkpoint's statistics are for msgms + features
    spy = CalibrationSpy(loaded)
    engine(tmp_path).test(loaded, datamodule=datamodule(tiny_root), verbose=False)
    assert len(torch.cat(spy.batches)) == 8  # all training images, again
    assert loaded.model.normal_statistics.mean.shape[1] == 1  # one measure now


def test_a_checkpoint_saved_before_the_memory_dilated_calibrates_again_unless_loaded_without_dilation(
    fitted: tuple[Smai, CalibrationSpy, Path], tiny_root: Path, tmp_path: Path
) -> None:
    _, _, path = fitted
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["smai_map_settings"]["memory_dilation"] == 3
    for saved in (checkpoint["smai_map_settings"], checkpoint["hyper_parameters"]):  # as saved before the setting
        del saved["memory_dilation"]
    legacy = tmp_path / "legacy.ckpt"
    torch.save(checkpoint, legacy)
    for settings, calibrates in (({}, True), ({"memory_dilation": 1}, False)):
        loaded = Smai.load_from_checkpoint(legacy, **settings)
        spy = CalibrationSpy(loaded)
        engine(tmp_path).test(loaded, datamodule=datamodule(tiny_root), verbose=False)
        assert bool(spy.batches) == calibrates


def test_an_uncalibrated_model_without_training_images_is_refused(tiny_root: Path, tmp_path: Path) -> None:
    model = Smai(**TINY_MODEL_ARGS, visualizer=False)
    image = next((tiny_root / "hazelnut_toy" / "test").rglob("*.png"))
    with pytest.raises(ValueError, match="no training images"):
        engine(tmp_path).predict(model, data_path=image)
