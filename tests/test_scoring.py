"""Leave-one-superpixel-out scoring with both of the paper's measures."""

import pytest
import torch
from torch import nn

from smai_plugin.anomaly_map import AnomalyMapGenerator, smooth
from smai_plugin.pennet import PenNetGenerator
from smai_plugin.schedule import ScoringMode, pass_holes, window_index
from smai_plugin.similarity import ScoreMeasure
from smai_plugin.superpixel import SuperpixelMasker

from .conftest import real_image


class NormalInpainter(nn.Module):
    """An ideal inpainter that knows the normal image: fills every hole with it."""

    def __init__(self, normal: torch.Tensor) -> None:
        super().__init__()
        self.normal = normal
        self.calls: list[int] = []

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, list]:
        self.calls.append(images.shape[0])
        return self.normal.expand_as(images), []


def image_tensor(size: int = 128) -> torch.Tensor:
    image = real_image("hazelnut_toy", "train", 0, size=size)
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


PIXEL_MEASURES = [measure for measure in ScoreMeasure if measure not in (ScoreMeasure.FEATURES, ScoreMeasure.MEMORY)]


@pytest.mark.parametrize("measure", PIXEL_MEASURES)
def test_map_is_high_only_where_the_image_differs_from_normal(measure: ScoreMeasure) -> None:
    normal = image_tensor()
    defective = normal.clone()
    defective[:, :, 40:60, 70:90] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]  # a red patch
    holes = SuperpixelMasker(n_superpixels=40)((defective + 1) / 2)
    scorer = AnomalyMapGenerator(measure, passes_per_batch=7, sigma=0)
    anomaly_map = scorer(NormalInpainter(normal), defective, holes)[0, 0]
    defect = torch.zeros_like(anomaly_map, dtype=torch.bool)
    defect[40:60, 70:90] = True
    assert anomaly_map[defect].mean() > 0.1
    assert anomaly_map[~defect.roll(6, 0).logical_or(defect.roll(-6, 0)).logical_or(defect)].max() < 0.05
    # A normal image scores zero everywhere.
    assert scorer(NormalInpainter(normal), normal, holes).abs().max() < 1e-5


def test_reconstruction_assembles_the_inpainted_superpixels() -> None:
    normal = image_tensor()
    defective = normal.clone()
    defective[:, :, 40:60, 70:90] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    holes = SuperpixelMasker(n_superpixels=40)((defective + 1) / 2)
    measures = ["ssim", "l2", "msgms", "features"]
    scorer = AnomalyMapGenerator(measures, comparison="reconstruction", passes_per_batch=7, sigma=0)
    # Every superpixel inpainted as normal: the reconstruction is the normal image itself.
    expected = scorer.dissimilarity(normal, defective)
    torch.testing.assert_close(scorer(NormalInpainter(normal), defective, holes), expected, atol=1e-5, rtol=1e-4)
    maps = expected[0]
    assert (maps[:, 45:55, 75:85].mean((1, 2)) > 5 * maps[:, 100:, :30].mean((1, 2))).all()
    assert scorer(NormalInpainter(normal), normal, holes).abs().max() < 1e-4
    with pytest.raises(ValueError, match="reconstruction"):
        AnomalyMapGenerator("features", comparison="per_pass")


def test_each_pixel_is_scored_in_its_own_pass_and_chunking_is_invisible() -> None:
    torch.manual_seed(0)
    normal, image = image_tensor(64), image_tensor(64) + 0.3 * torch.randn(1, 3, 64, 64)
    holes = SuperpixelMasker(n_superpixels=12)((image.clamp(-1, 1) + 1) / 2).repeat(1, 1, 1, 1)
    images = torch.cat([image, normal])
    holes = torch.cat([holes, holes])
    results = []
    for passes_per_batch in (1, 5, 100):
        inpainter = NormalInpainter(normal)
        results.append(AnomalyMapGenerator("l2", passes_per_batch=passes_per_batch, sigma=0)(inpainter, images, holes))
        assert max(inpainter.calls) <= 2 * passes_per_batch  # bounded batch per call
        assert sum(inpainter.calls) == 2 * 12  # every pass of every image, once
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])
    expected = ((image - normal) / 2).pow(2).mean(1, keepdim=True)
    torch.testing.assert_close(results[0][:1], expected)  # superpixels partition: one value per pixel


def test_smoothing_and_bad_settings() -> None:
    spike = torch.zeros(1, 1, 64, 64)
    spike[..., 32, 32] = 1
    smoothed = smooth(spike, sigma=4)
    assert 0 < smoothed.max() < 0.05
    assert smoothed.sum() == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ValueError, match="score_measure"):
        AnomalyMapGenerator("l1")
    with pytest.raises(ValueError, match="passes_per_batch"):
        AnomalyMapGenerator(passes_per_batch=0)


class BlankInpainter(nn.Module):
    """Fills every hole with grey: a pixel's result depends on that pixel only, not on the crop."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, ...]] = []

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, list]:
        self.sizes.append(tuple(images.shape[-2:]))
        return torch.zeros_like(images), []


def test_windowed_passes_inpaint_crops_and_score_like_leave_one_out() -> None:
    image = image_tensor(128)
    holes = SuperpixelMasker(n_superpixels=40)((image + 1) / 2)  # superpixels about 20 px wide
    scorer = AnomalyMapGenerator("l2", passes_per_batch=16, sigma=0)
    full_inpainter, window_inpainter = BlankInpainter(), BlankInpainter()
    full = scorer(full_inpainter, image, holes)
    windowed = scorer(window_inpainter, image, holes, window=(64, 64))
    assert set(full_inpainter.sizes) == {(128, 128)}
    assert set(window_inpainter.sizes) == {(64, 64)}  # every pass on a crop, also in the corners
    extent = [(hole.nonzero().amax(0) - hole.nonzero().amin(0) + 1).max() for hole in holes[0] if hole.any()]
    assert max(extent) <= 64  # so every superpixel fits its window, and the maps must agree
    torch.testing.assert_close(windowed, full)
    # A window narrower than a superpixel scores only the part inside it.
    narrow = scorer(BlankInpainter(), image, holes, window=(8, 8))
    assert (narrow <= full + 1e-6).all()
    assert narrow.sum() < 0.5 * full.sum()


@pytest.mark.parametrize("scoring", [ScoringMode.WINDOWED, ScoringMode.LEAVE_ONE_OUT])
def test_masks_past_the_grid_get_no_pass_and_need_none(scoring: ScoringMode) -> None:
    image = image_tensor(128)
    superpixels = SuperpixelMasker(n_superpixels=40)((image + 1) / 2)
    assert not superpixels[:, 36:].any()  # SLIC's centres make a 6 x 6 grid
    holes = pass_holes(superpixels, scoring)
    assert torch.equal(holes, superpixels[:, :36])
    # The passes of empty masks would change nothing: the maps agree with and without them.
    generator = PenNetGenerator(base_channels=4).eval()
    scorer = AnomalyMapGenerator(["msgms", "l2"], comparison="reconstruction", sigma=0)
    window = (64, 64) if scoring == ScoringMode.WINDOWED else None
    with torch.no_grad():
        with_empty_passes = scorer(generator, image, superpixels, window)
        torch.testing.assert_close(scorer(generator, image, holes, window), with_empty_passes)


def test_window_index_centres_the_crop_on_the_hole_inside_the_image() -> None:
    holes = torch.zeros(1, 3, 16, 16)
    holes[0, 0, 6:10, 5:9] = 1  # centre (8, 7)
    holes[0, 1, 14:16, 14:16] = 1  # bottom-right corner
    index = window_index(holes, (8, 8)).reshape(3, 8, 8)
    rows, cols = index // 16, index % 16
    assert (rows[0, 0, 0].item(), cols[0, 0, 0].item()) == (4, 3)
    assert (rows[1, -1, -1].item(), cols[1, -1, -1].item()) == (15, 15)  # moved inside the image
    assert (rows[2, 0, 0].item(), cols[2, 0, 0].item()) == (4, 4)  # empty hole: central crop
    assert torch.equal(rows[0], rows[0, :, :1].expand(-1, 8))  # row-major, contiguous
