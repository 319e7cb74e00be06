"""The score measures: MSGMS against hand-computed values, the feature distance, measure lists."""

import pytest
import torch

from smai_plugin.backbone import _lite0_state_dict
from smai_plugin.similarity import GMS_CONSTANT, Dissimilarity, PretrainedFeatures, msgms_distance, parse_measures

from .conftest import real_image


def signed(unit: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to PEN-Net's [-1, 1]."""
    return unit * 2 - 1


def test_gms_of_two_steps_matches_the_formula() -> None:
    # Vertical steps at the same place, 0.5 and 0.25 high: Prewitt magnitudes 0.5 and 0.25 on
    # the two columns beside the step, 0 elsewhere (flat: GMS 1).
    first, second = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    first[..., 4:] = 0.5
    second[..., 4:] = 0.25
    gms = 1 - msgms_distance(signed(first), signed(second), scales=1)[0, 0]
    c = GMS_CONSTANT
    expected = (2 * 0.5 * 0.25 + c) / (0.5**2 + 0.25**2 + c)  # 0.80165
    torch.testing.assert_close(gms[:, 3:5], torch.full((8, 2), expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(gms[:, [0, 1, 2, 5, 6, 7]], torch.ones(8, 6), atol=1e-5, rtol=0)


def test_msgms_averages_the_scales() -> None:
    # Horizontal ramps of slopes 0.01 and 0.02 per pixel: Prewitt magnitude is twice the slope,
    # and each 2x2 average pooling doubles the slope per pixel, so inside the image
    # GMS at scale 0 is (2 * 0.02 * 0.04 + c) / (0.02^2 + 0.04^2 + c), at scale 1 with 0.04 and 0.08.
    ramp = torch.arange(32.0).expand(1, 3, 32, 32)
    first, second = 0.2 + 0.01 * ramp, 0.2 + 0.02 * ramp
    c = GMS_CONSTANT

    def gms(g1: float, g2: float) -> float:
        return (2 * g1 * g2 + c) / (g1**2 + g2**2 + c)

    maps = 1 - msgms_distance(signed(first), signed(second), scales=2)[0, 0]
    expected = (gms(0.02, 0.04) + gms(0.04, 0.08)) / 2  # (0.91304 + 0.84906) / 2
    torch.testing.assert_close(maps[8:24, 8:24], torch.full((16, 16), expected), atol=1e-4, rtol=0)


def test_every_measure_is_zero_for_identical_images_and_grows_with_a_defect() -> None:
    image = signed(torch.from_numpy(real_image("hazelnut_toy", "test", size=128).copy()).permute(2, 0, 1)[None] / 255)
    defective = image.clone()
    defective[..., 40:72, 40:72] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    measure = Dissimilarity(["ssim", "l2", "msgms", "features"])
    same = measure(image, image)
    assert same.shape == (1, 4, 128, 128)
    assert same.abs().max() < 1e-4
    maps = measure(defective, image)
    inside, outside = maps[..., 48:64, 48:64].mean((2, 3)), maps[..., :16, 100:].mean((2, 3))
    assert (inside > 5 * outside).all(), (inside, outside)


def test_pretrained_features_keep_their_backbone_out_of_checkpoints_and_frozen() -> None:
    features = PretrainedFeatures()
    assert not any(key.startswith("backbone") for key in features.state_dict())
    assert all(not parameter.requires_grad for parameter in features.parameters())
    features.train()
    assert not features.backbone.training  # batch-norm statistics stay the pretrained ones
    fresh = PretrainedFeatures()
    assert not fresh.load_state_dict(features.state_dict()).missing_keys


@pytest.mark.parametrize("cached", [False, True])
def test_loading_the_pretrained_backbone_leaves_the_random_state_alone(cached: bool) -> None:
    # Otherwise what is initialised next (SMAI's discriminator) would depend on whether the
    # weights were already loaded in this process: the same seed, other models.
    if not cached:
        _lite0_state_dict.cache_clear()
    state = torch.get_rng_state()
    PretrainedFeatures()
    assert torch.equal(torch.get_rng_state(), state)


def test_measure_lists_are_checked() -> None:
    assert [m.value for m in parse_measures("msgms")] == ["msgms"]
    assert [m.value for m in parse_measures(["ssim", "features"])] == ["ssim", "features"]
    for bad in ([], ["ssim", "ssim"]):
        with pytest.raises(ValueError, match="distinct"):
            parse_measures(bad)
    with pytest.raises(ValueError, match="score_measure"):
        parse_measures(["ssim", "l1"])
