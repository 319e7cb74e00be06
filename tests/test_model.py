"""PEN-Net, the losses and the torch model in both modes."""

import pytest
import torch
from anomalib.data import InferenceBatch

from smai_plugin.loss import SmaiLoss, discriminator_hinge_loss
from smai_plugin.pennet import PenNetDiscriminator, PenNetGenerator
from smai_plugin.superpixel import SuperpixelMasker
from smai_plugin.torch_model import SmaiModel, random_superpixel_holes

from .conftest import real_image


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_pennet_sizes_match_the_paper() -> None:
    assert n_params(PenNetGenerator(32)) == pytest.approx(10.2e6, rel=0.01)
    assert n_params(PenNetDiscriminator(64)) == pytest.approx(4.3e6, rel=0.01)
    output, pyramid = PenNetGenerator(8)(torch.rand(2, 3, 128, 128) * 2 - 1, torch.zeros(2, 1, 128, 128))
    assert output.shape == (2, 3, 128, 128)
    assert [p.shape[-1] for p in pyramid] == [4, 8, 16, 32, 64]
    assert output.abs().max() <= 1


def test_generator_learns_to_fill_holes() -> None:
    torch.manual_seed(0)
    generator = PenNetGenerator(8)
    image = torch.from_numpy(real_image("hazelnut_toy", "train", size=64).copy()).permute(2, 0, 1).float() / 127.5 - 1
    images = image.expand(4, -1, -1, -1)
    holes = torch.zeros(4, 1, 64, 64)
    holes[..., 16:40, 16:40] = 1
    loss = SmaiLoss(adversarial_weight=0.0)
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        output, pyramid = generator(images, holes)
        terms = loss(images, holes, output, pyramid, torch.zeros(1))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < 0.6 * losses[0]


def test_loss_terms() -> None:
    images = torch.zeros(1, 3, 64, 64)
    holes = torch.zeros(1, 1, 64, 64)
    holes[..., :32, :] = 1
    output = images.clone()
    output[..., :32, :] = 0.5  # wrong only inside the hole
    pyramid = [torch.zeros(1, 3, s, s) for s in (2, 4, 8, 16, 32)]
    terms = SmaiLoss()(images, holes, output, pyramid, fake_scores=torch.full((1, 1, 4, 4), 2.0))
    assert terms["hole_l1"].item() == pytest.approx(0.5)
    assert terms["valid_l1"].item() == pytest.approx(0.0)
    assert terms["adversarial"].item() == pytest.approx(-2.0)
    assert terms["ssim"].item() > 0
    expected = 6 * 0.5 + 0.1 * -2.0 + terms["ssim"].item()
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert discriminator_hinge_loss(torch.full((2,), 1.0), torch.full((2,), -1.0)).item() == 0.0
    assert discriminator_hinge_loss(torch.zeros(2), torch.zeros(2)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-negative"):
        SmaiLoss(hole_weight=-1)


def test_random_holes_pick_n_superpixels_per_image() -> None:
    torch.manual_seed(0)
    superpixels = SuperpixelMasker(n_superpixels=20)(torch.rand(3, 3, 64, 64))
    holes = random_superpixel_holes(superpixels, 5)
    assert holes.shape == (3, 1, 64, 64)
    assert set(holes.unique().tolist()) <= {0.0, 1.0}
    for image_superpixels, hole in zip(superpixels, holes, strict=True):
        inside = (image_superpixels * hole).flatten(1).sum(1)
        sizes = image_superpixels.flatten(1).sum(1)
        assert int(((inside == sizes) & (sizes > 0)).sum()) == 5  # whole superpixels only
        assert int(((inside > 0) & (inside < sizes)).sum()) == 0


def test_torch_model_modes() -> None:
    model = SmaiModel(n_superpixels=9, base_channels=8)
    images = torch.rand(2, 3, 64, 64)
    output, _ = model(images, torch.zeros(2, 1, 64, 64))
    assert output.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="holes"):
        model(images)
    model.eval()
    with torch.no_grad():
        result = model(images)
    assert isinstance(result, InferenceBatch)
    assert result.pred_score.shape == (2,)
    assert result.anomaly_map.shape == (2, 1, 64, 64)
    torch.testing.assert_close(result.pred_score, result.anomaly_map.amax(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="multiples of 64"):
        model(torch.rand(1, 3, 100, 100))
    with pytest.raises(ValueError, match="scoring"):
        SmaiModel(scoring="everything")


def test_windowed_training_shows_the_network_what_a_windowed_pass_shows() -> None:
    torch.manual_seed(0)
    image = torch.from_numpy(real_image("hazelnut_toy", "train", 0, size=128).copy()).permute(2, 0, 1).float() / 255
    images = torch.stack([image, image.flip(-1)])
    model = SmaiModel(n_superpixels=40, base_channels=8, scoring="windowed", window_size=64)
    crops, holes = model.training_inputs(images, n_masked=3)
    assert crops.shape == (6, 3, 64, 64)
    assert holes.shape == (6, 1, 64, 64)
    superpixels = model.masker(images)
    for index, (crop, hole) in enumerate(zip(crops, holes, strict=True)):
        source = images[index // 3]
        # The crop is a piece of its image, and the hole is one whole superpixel of that image.
        found = (source.unfold(1, 64, 1).unfold(2, 64, 1) == crop[:, None, None]).all(0).all(-1).all(-1).nonzero()
        assert len(found) >= 1
        top, left = found[0].tolist()
        pieces = superpixels[index // 3][:, top : top + 64, left : left + 64]
        matches = [k for k in range(40) if torch.equal(pieces[k], hole[0])]
        assert len(matches) == 1
        assert hole.sum() == superpixels[index // 3, matches[0]].sum() > 0
    # Whole-image training (the paper's) for the other schedules.
    for scoring in ("leave_one_out", "grouped"):
        same, holes = SmaiModel(n_superpixels=40, base_channels=8, scoring=scoring).training_inputs(images, 3)
        assert same is images
        assert holes.shape == (2, 1, 128, 128)
    with pytest.raises(ValueError, match="window_size"):
        SmaiModel(window_size=96)
