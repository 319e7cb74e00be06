"""Inpainting only the superpixels the memory finds most suspicious (``inpainted_superpixels``)."""

import pytest
import torch

from smai_plugin import SmaiInputError, SmaiModel
from smai_plugin.schedule import ScoringMode

from .conftest import real_image


def quadrants() -> torch.Tensor:
    """Five passes on an 8x8 image: the four quadrants and one empty hole."""
    holes = torch.zeros(1, 5, 8, 8)
    for index in range(4):
        row, column = divmod(index, 2)
        holes[0, index, 4 * row : 4 * row + 4, 4 * column : 4 * column + 4] = 1
    return holes


def test_the_passes_with_the_highest_mean_distance_are_kept() -> None:
    model = SmaiModel(n_superpixels=4, score_measure=["msgms", "memory"], calibration="score", inpainted_superpixels=2)
    distance = torch.zeros(1, 1, 16, 16)  # the memory's map, at twice the holes' size
    distance[..., 8:, :8] = 3.0  # quadrant 2 (bottom left): mean 3
    distance[..., :8, 8:] = 1.0  # quadrant 1 (top right): mean 1
    distance[..., 0, 0] = 8.0  # one pixel in quadrant 0: mean 8 / 16 = 0.5 (a mean, not a maximum)
    chosen = model.most_suspicious(quadrants(), distance)
    assert torch.equal(chosen, quadrants()[:, [2, 1]])
    # Asked for more than there are non-empty holes: the empty one comes last.
    model.inpainted_superpixels = 5
    assert torch.equal(model.most_suspicious(quadrants(), distance), quadrants()[:, [2, 1, 0, 3, 4]])


def images(count: int = 3) -> torch.Tensor:
    return (
        torch.stack(
            [torch.from_numpy(real_image("hazelnut_toy", "train", index, size=64).copy()) for index in range(count)]
        )
        .permute(0, 3, 1, 2)
        .float()
        / 255
    )


@pytest.mark.parametrize("scoring", [ScoringMode.WINDOWED, ScoringMode.LEAVE_ONE_OUT])
def test_scoring_inpaints_k_superpixels_and_the_rest_reads_as_normal(scoring: ScoringMode) -> None:
    torch.manual_seed(0)
    model = SmaiModel(
        n_superpixels=9,
        base_channels=8,
        scoring=scoring,
        score_measure=["msgms", "memory"],
        comparison="reconstruction",
        calibration="score",
        inpainted_superpixels=3,
    ).eval()
    normal, test = images(3), images(5)[3:]
    inpainted: list[int] = []
    model.generator.register_forward_hook(lambda module, inputs, output: inpainted.append(len(inputs[0])))
    model.calibrate([normal])
    passes = model.pass_holes(model.inpainting_input(normal)).shape[1]
    assert sum(inpainted) == 3 * passes  # the calibration inpaints every superpixel
    inpainted.clear()
    with torch.no_grad():
        maps = model.difference_maps(test)
        holes = model.most_suspicious(model.pass_holes(test), maps[:, 1:])
    assert sum(inpainted) == 2 * 3  # each pass is one generator input (a crop or a whole image)
    assert holes.shape[1] == 3
    covered = holes.amax(dim=1, keepdim=True) > 0
    normal_mean = model.normal_statistics.mean[:, :1].expand_as(covered)
    assert torch.equal(maps[:, :1][~covered], normal_mean[~covered])
    assert not torch.allclose(maps[:, :1][covered], normal_mean[covered])  # measured where inpainted
    assert 0.1 < covered.float().mean() < 0.6  # 3 of 9 superpixels


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"score_measure": "msgms"}, "needs the memory"),
        ({"score_measure": "memory", "calibration": "score"}, "needs the memory"),
        ({"score_measure": ["msgms", "memory"], "calibration": "score", "scoring": "grouped"}, "one"),
        ({"score_measure": ["msgms", "memory"], "calibration": "score", "inpainted_superpixels": 0}, "at least 1"),
    ],
)
def test_settings_without_a_ranking_are_refused(settings: dict, match: str) -> None:
    with pytest.raises(SmaiInputError, match=match):
        SmaiModel(**{"inpainted_superpixels": 2, **settings})
