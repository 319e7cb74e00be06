"""The memory of normal features: nearest neighbours, leaving an image's own features out, its size."""

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from smai_plugin.memory import FeatureMemory
from smai_plugin.torch_model import SmaiModel


def unit(*rows: list[float]) -> torch.Tensor:
    """Unit vectors as a (1, C, 1, N) feature map: one image, N positions in a row."""
    return F.normalize(torch.tensor(rows).T[None, :, None, :], dim=1)


def test_distance_is_one_minus_the_cosine_of_the_nearest_normal_vector() -> None:
    memory = FeatureMemory(size=100, n_levels=1)
    memory.fit([[unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])], [unit([0.0, 0.0, 1.0], [1.0, 1.0, 0.0])]])
    assert [tuple(bank.shape) for bank in memory.banks] == [(4, 3)]
    queries = unit([1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [1.0, 1.0, 1.0], [0.6, 0.8, 0.0])
    distance = memory([queries], size=(1, 4))[0, 0, 0]
    # A normal vector itself; opposite to one and orthogonal to the rest; cos 1/sqrt(3) from three
    # of them (and sqrt(2/3) from [1, 1, 0]); nearest [1, 1, 0] (cos 1.4 / sqrt(2)).
    expected = torch.tensor([0.0, 1.0, 1 - (2 / 3) ** 0.5, 1 - 1.4 / 2**0.5])
    torch.testing.assert_close(distance, expected, atol=1e-6, rtol=0)


def test_leave_out_ignores_only_the_images_own_vectors() -> None:
    memory = FeatureMemory(size=100, n_levels=1)
    first, second = unit([1.0, 0.0], [1.0, 0.0]), unit([0.0, 1.0], [1.0, 1.0])
    memory.fit([[torch.cat([first, second])]])  # one batch: image 0, image 1
    both = torch.cat([first, second])
    torch.testing.assert_close(memory([both], size=(1, 2)), torch.zeros(2, 1, 1, 2))
    # Image 0 without its own vectors: nearest is [1, 1] (cos 1/sqrt(2)); image 1 without its own: [1, 0].
    left_out = memory([both], size=(1, 2), leave_out=torch.tensor([0, 1]))[:, 0, 0]
    expected = torch.tensor([[1 - 0.5**0.5] * 2, [1.0, 1 - 0.5**0.5]])
    torch.testing.assert_close(left_out, expected, atol=1e-6, rtol=0)


def test_the_memory_keeps_a_seeded_sample_of_its_size_and_travels_in_state_dicts() -> None:
    torch.manual_seed(0)
    batches = [[F.normalize(torch.randn(3, 8, 4, 4), dim=1), F.normalize(torch.randn(3, 16, 2, 2), dim=1)]]
    memory, again = FeatureMemory(size=20, n_levels=2), FeatureMemory(size=20, n_levels=2)
    memory.fit(batches)
    torch.manual_seed(1)  # the sample does not depend on the global random state
    again.fit(batches)
    assert [tuple(bank.shape) for bank in memory.banks] == [(20, 8), (12, 16)]  # 48 positions, 12 positions
    for bank, repeat in zip(memory.banks, again.banks, strict=True):
        assert torch.equal(bank, repeat)
    every_vector = batches[0][0].flatten(2).transpose(1, 2).flatten(0, 1)
    assert ((memory.bank_0[:, None] - every_vector[None]).abs().amax(2) == 0).any(1).all()  # real vectors
    fresh = FeatureMemory(size=20, n_levels=2)
    fresh.load_state_dict(memory.state_dict())
    torch.testing.assert_close(fresh(batches[0], (8, 8)), memory(batches[0], (8, 8)))
    with pytest.raises(ValueError, match="not fitted"):
        FeatureMemory(n_levels=2)(batches[0], (8, 8))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureMemory(n_levels=2).fit([[level[:1] for level in batches[0]]])
    with pytest.raises(ValueError, match="memory_size"):
        FeatureMemory(size=0)
    with pytest.raises(ValueError, match="2 levels, got features of 1"):
        FeatureMemory(n_levels=2).fit([batches[0][:1]])


def test_calibration_fits_the_memory_then_the_statistics_without_each_images_own_features() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64)
    args = {"n_superpixels": 9, "base_channels": 8, "comparison": "reconstruction"}
    model = SmaiModel(**args, score_measure=["l2", "memory"], calibration="score")
    model.calibrate([images[:2], images[2:]])
    assert [len(bank) for bank in model.memory.banks] == [4 * 16 * 16, 4 * 8 * 8, 4 * 4 * 4]
    with torch.no_grad():
        own = model.difference_maps(images)
        left_out = model.difference_maps(images, leave_out=torch.arange(4))
    assert own[:, 1].abs().max() < 1e-5  # every position finds itself
    assert left_out[:, 1].amin() > 0.01
    torch.testing.assert_close(model.normal_statistics.mean, left_out.mean(0, keepdim=True), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="iterate twice"):
        model.calibrate(iter([images[:2], images[2:]]))
    with pytest.raises(ValueError, match="calibrate"):
        SmaiModel(**args, score_measure="memory", calibration="none")
    with pytest.raises(ValueError, match="reconstruction"):
        SmaiModel(**{**args, "comparison": "per_pass"}, score_measure="memory", calibration="score")


def test_checkpoints_load_across_models_with_and_without_a_memory() -> None:
    torch.manual_seed(0)
    args = {"n_superpixels": 9, "base_channels": 8, "comparison": "reconstruction", "calibration": "score"}
    with_memory = SmaiModel(**args, score_measure=["msgms", "memory"])
    with_memory.calibrate([torch.rand(2, 3, 64, 64)])
    without = SmaiModel(**args, score_measure="msgms")
    without.load_state_dict(with_memory.state_dict())  # the memory is not used: left out
    torch.testing.assert_close(without.generator.state_dict(), with_memory.generator.state_dict())
    fresh = SmaiModel(**args, score_measure=["msgms", "memory"])
    fresh.load_state_dict(without.state_dict())  # no memory saved: it stays empty, to be fitted
    assert not fresh.memory.is_fitted
    assert not fresh.is_calibrated
    fresh.load_state_dict(with_memory.state_dict())
    for bank, saved in zip(fresh.memory.banks, with_memory.memory.banks, strict=True):
        assert torch.equal(bank, saved)
