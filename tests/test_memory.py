"""The memory of normal patches: description, whitening, nearest neighbours, leave-out, coreset, checkpoints."""

import math

import pytest
import torch

from smai_plugin.memory import SHRINKAGE, FeatureMemory, first_argmin, greedy_coreset, position_share
from smai_plugin.torch_model import SmaiModel


def patches(*rows: list[float]) -> torch.Tensor:
    """Vectors as a (1, C, 1, N) embedding: one image, N positions in a row."""
    return torch.tensor(rows).T[None, :, None, :]


def test_embedding_averages_each_level_over_its_neighbourhood_and_joins_the_levels() -> None:
    fine, coarse = torch.ones(1, 2, 3, 3), torch.tensor([[[[2.0]]]])  # 2 channels 3x3, 1 channel 1x1
    joined = FeatureMemory(neighbourhood=1).embed([fine, coarse])
    assert joined.shape == (1, 3, 3, 3)
    torch.testing.assert_close(joined[0, 2], torch.full((3, 3), 2.0))  # the coarse level on the fine grid
    pooled = FeatureMemory(neighbourhood=3).embed([fine, coarse])[0, 0]
    # A 3x3 mean with zero padding: 9/9 in the centre, 6/9 on an edge, 4/9 in a corner (PatchCore's pooling).
    expected = torch.tensor([[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]) / 9
    torch.testing.assert_close(pooled, expected)
    with pytest.raises(ValueError, match="memory_neighbourhood must be odd"):
        FeatureMemory(neighbourhood=2)


def test_several_windows_describe_each_patch_at_each_window_joined_in_their_order() -> None:
    fine, coarse = torch.ones(1, 2, 3, 3), torch.tensor([[[[2.0]]]])
    both = FeatureMemory(neighbourhood=(3, 1)).embed([fine, coarse])
    assert both.shape == (1, 6, 3, 3)  # (2 + 1 channels) per window
    torch.testing.assert_close(both[:, :3], FeatureMemory(neighbourhood=3).embed([fine, coarse]))
    torch.testing.assert_close(both[:, 3:], FeatureMemory(neighbourhood=1).embed([fine, coarse]))
    for windows in ((), (3, 2)):
        with pytest.raises(ValueError, match="memory_neighbourhood"):
            FeatureMemory(neighbourhood=windows)


def test_dilation_gives_each_position_the_largest_distance_of_its_window() -> None:
    normal = patches([0.0], [0.0], [0.0], [0.0], [0.0])
    query = patches([0.0], [0.0], [0.0], [4.0], [0.0])  # one odd patch in a row of five
    distances = {}
    for dilation in (1, 3, 5):
        memory = FeatureMemory(size=10, dilation=dilation, whitening=False)
        memory.fit([normal, normal])
        distances[dilation] = memory(query, size=(1, 5))[0, 0, 0].tolist()
    assert distances[1] == [0.0, 0.0, 0.0, 4.0, 0.0]
    assert distances[3] == [0.0, 0.0, 4.0, 4.0, 4.0]  # its neighbours on either side
    assert distances[5] == [0.0, 4.0, 4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="memory_dilation must be odd"):
        FeatureMemory(dilation=2)


def test_distance_is_euclidean_to_the_nearest_normal_patch() -> None:
    memory = FeatureMemory(size=100, dilation=1, whitening=False)
    memory.fit([patches([0.0, 0.0], [3.0, 0.0]), patches([0.0, 4.0], [10.0, 10.0])])
    assert tuple(memory.bank.shape) == (4, 2)
    queries = patches([0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [9.0, 10.0])
    distance = memory(queries, size=(1, 4))[0, 0, 0]
    # itself; 3 from [3, 0] and from [0, 4]; sqrt(2) from [0, 0]; 1 from [10, 10].
    torch.testing.assert_close(distance, torch.tensor([0.0, 3.0, 2**0.5, 1.0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("angle", [0.0, 30.0])
def test_whitened_distances_count_each_direction_by_how_much_normal_patches_vary_along_it(angle: float) -> None:
    # Normal patches vary 10x more along the first axis than along the second (turned by ``angle``:
    # the whitening follows the covariance's axes, not the channels).
    turn = torch.tensor(math.radians(angle))
    rotation = torch.stack([torch.stack([turn.cos(), -turn.sin()]), torch.stack([turn.sin(), turn.cos()])])

    def turned(*rows: list[float]) -> torch.Tensor:
        return patches(*((rotation @ torch.tensor(row)).tolist() for row in rows))

    memory = FeatureMemory(size=100, dilation=1, whitening=True)
    memory.fit([turned([-10.0, 0.0], [10.0, 0.0]), turned([0.0, -1.0], [0.0, 1.0])])
    assert memory.is_whitened
    # Mean 0; variances (n - 1 = 3) 200/3 and 2/3 along the axes, shrunk by SHRINKAGE of their mean.
    shrink = SHRINKAGE * (200 / 3 + 2 / 3) / 2
    wide, narrow = (200 / 3 + shrink) ** -0.5, (2 / 3 + shrink) ** -0.5
    distance = memory(turned([13.0, 0.0], [10.0, 1.0], [0.0, 0.0]), size=(1, 3))[0, 0, 0]
    # 3 along the wide axis from [10, 0]; 1 along the narrow axis from [10, 0] now counts more;
    # the mean is nearest to [0, +-1] (the narrow axis's unit, 10 times shorter than the wide one's).
    torch.testing.assert_close(distance, torch.tensor([3 * wide, narrow, narrow]), atol=1e-4, rtol=0)
    euclidean = FeatureMemory(size=100, dilation=1, whitening=False)
    euclidean.fit([turned([-10.0, 0.0], [10.0, 0.0]), turned([0.0, -1.0], [0.0, 1.0])])
    plain = euclidean(turned([13.0, 0.0], [10.0, 1.0]), size=(1, 2))[0, 0, 0]
    torch.testing.assert_close(plain, torch.tensor([3.0, 1.0]), atol=1e-4, rtol=0)  # the other order


@pytest.mark.parametrize("length", [1, 5, 64, 100, 4096])
def test_the_two_step_argmin_finds_the_first_smallest_value_as_argmin_does(length: int) -> None:
    generator = torch.Generator().manual_seed(length)
    # Few distinct values, so that most rows hold ties, across and within groups of 8.
    values = torch.randint(0, 4, (6, 3, length), generator=generator).float()
    values[0, 0] = float("inf")  # a row whose vectors are all left out
    values[0, 1, -1] = -1.0  # the smallest value last, in a group that padding fills
    torch.testing.assert_close(first_argmin(values, group=8), values.argmin(-1), rtol=0, atol=0)
    assert int(first_argmin(values, group=8)[0, 1]) == length - 1


def test_the_memory_whitens_by_default_only_where_patches_do_not_depend_on_their_position() -> None:
    # One channel, two positions: the same pair in both images puts all variance between the
    # positions (share 1); the pair swapped in the second image puts none there (share 0).
    aligned = [patches([0.0], [2.0]), patches([0.0], [2.0])]
    texture = [patches([0.0], [2.0]), patches([2.0], [0.0])]
    # position_share takes (images, positions, C).
    assert position_share(torch.tensor([[[0.0], [2.0]], [[0.0], [2.0]]])) == pytest.approx(1.0)
    assert position_share(torch.tensor([[[0.0], [2.0]], [[2.0], [0.0]]])) == pytest.approx(0.0)
    for images, share, whitened in ((aligned, 1.0, False), (texture, 0.0, True)):
        chosen = FeatureMemory(size=10)
        chosen.fit(images)
        assert chosen.position_share == pytest.approx(share)
        assert chosen.is_whitened == whitened
        assert ("under 0.65" if whitened else "at least 0.65") in chosen.whitening_choice
        for forced in (True, False):  # an explicit setting wins over the measurement
            memory = FeatureMemory(size=10, whitening=forced)
            memory.fit(images)
            assert memory.is_whitened == forced


def test_normal_patches_that_never_vary_are_not_whitened_and_give_finite_distances() -> None:
    # Blank training images: every patch vector the same, so the covariance is 0 and a whitening
    # would divide by it. The memory keeps Euclidean distances instead, chosen or forced.
    blank = [patches([1.0, 1.0], [1.0, 1.0]), patches([1.0, 1.0], [1.0, 1.0])]
    for whitening in (None, True):
        memory = FeatureMemory(size=10, dilation=1, whitening=whitening)
        memory.fit(blank)
        assert not memory.is_whitened
        distance = memory(patches([1.0, 1.0], [4.0, 5.0]), size=(1, 2))[0, 0, 0]
        torch.testing.assert_close(distance, torch.tensor([0.0, 5.0]), atol=1e-5, rtol=0)
    assert memory.position_share == 1.0


def test_leave_out_ignores_only_the_images_own_patches() -> None:
    memory = FeatureMemory(size=100, dilation=1, whitening=False)
    first, second = patches([0.0, 0.0], [1.0, 0.0]), patches([0.0, 3.0], [5.0, 0.0])
    both = torch.cat([first, second])
    memory.fit([both])  # one batch: image 0, image 1
    torch.testing.assert_close(memory(both, size=(1, 2)), torch.zeros(2, 1, 1, 2))
    left_out = memory(both, size=(1, 2), leave_out=torch.tensor([0, 1]))[:, 0, 0]
    # Image 0 against image 1's [0, 3] and [5, 0]; image 1 against image 0's [0, 0] and [1, 0].
    expected = torch.tensor([[3.0, 10**0.5], [3.0, 4.0]])
    torch.testing.assert_close(left_out, expected, atol=1e-5, rtol=0)


def test_the_coreset_covers_every_cluster_and_random_sampling_is_seeded() -> None:
    # Three tight clusters of different sizes: a coreset of 3 takes one vector from each.
    torch.manual_seed(0)
    clusters = [
        torch.randn(n, 2) * 0.01 + torch.tensor(centre) for n, centre in ((50, [0, 0]), (5, [9, 0]), (1, [0, 9]))
    ]
    vectors = torch.cat(clusters)
    chosen = greedy_coreset(vectors, 3, torch.Generator().manual_seed(1))
    assert sorted(int(index >= 50) + int(index >= 55) for index in chosen) == [0, 1, 2]
    embedding = vectors.T[None, :, None, :]
    coreset, sample = FeatureMemory(size=3, whitening=False), FeatureMemory(size=3, sampling="random", whitening=False)
    coreset.fit([embedding, embedding])
    sample.fit([embedding, embedding])
    torch.manual_seed(5)  # neither depends on the global random state
    again = FeatureMemory(size=3, sampling="random", whitening=False)
    again.fit([embedding, embedding])
    assert torch.equal(sample.bank, again.bank)
    # The coreset's farthest normal patch is near (clusters covered); a random sample misses the small ones.
    assert coreset(embedding, (1, 56)).amax() < 0.1 < sample(embedding, (1, 56)).amax()
    with pytest.raises(ValueError, match="memory_sampling"):
        FeatureMemory(sampling="kmeans")


def test_the_memory_travels_in_state_dicts_and_refuses_misuse() -> None:
    torch.manual_seed(0)
    embedding = torch.randn(3, 8, 4, 4)
    memory = FeatureMemory(size=20)
    memory.fit([embedding])
    fresh = FeatureMemory(size=20)
    fresh.load_state_dict(memory.state_dict())
    torch.testing.assert_close(fresh(embedding, (8, 8)), memory(embedding, (8, 8)))
    assert "source" not in memory.state_dict()  # only the calibration after the fit needs it
    # A memory saved before it whitened (a bank of unwhitened vectors) is fitted again.
    legacy = FeatureMemory(size=20)
    legacy.load_state_dict({"bank": memory.bank})
    assert not legacy.is_fitted
    with pytest.raises(ValueError, match="not fitted"):
        FeatureMemory()(embedding, (8, 8))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureMemory().fit([embedding[:1]])
    with pytest.raises(ValueError, match="memory_size"):
        FeatureMemory(size=0)


def test_calibration_fits_the_memory_then_the_statistics_without_each_images_own_patches() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64)
    args = {"n_superpixels": 9, "base_channels": 8, "comparison": "reconstruction"}
    model = SmaiModel(**args, score_measure=["l2", "memory"], calibration="score")
    model.calibrate([images[:2], images[2:]])
    assert tuple(model.memory.bank.shape) == (4 * 8 * 8, 2 * (40 + 112))  # 4 images at stride 8, 2 windows
    with torch.no_grad():
        own = model.difference_maps(images)
        left_out = model.difference_maps(images, leave_out=torch.arange(4))
    assert own[:, 1].abs().max() < 1e-5  # every patch finds itself
    assert left_out[:, 1].amin() > 0.1 * left_out[:, 1].mean()
    torch.testing.assert_close(model.normal_statistics.mean, left_out.mean(0, keepdim=True), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="iterate twice"):
        model.calibrate(iter([images[:2], images[2:]]))
    with pytest.raises(ValueError, match="calibrate"):
        SmaiModel(**args, score_measure="memory", calibration="none")


def test_the_memory_alone_inpaints_nothing_and_the_image_score_follows_it() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64)
    alone = SmaiModel(n_superpixels=9, base_channels=8, score_measure="memory", calibration="score")
    assert alone.anomaly_map_generator is None
    alone.calibrate([images[:2], images[2:]])
    assert alone.eval()(images).anomaly_map.shape == (4, 1, 64, 64)
    both = SmaiModel(n_superpixels=9, base_channels=8, score_measure=["msgms", "memory"], calibration="score")
    assert both.image_score_channels == [1]  # by default the memory ranks the images
    every = SmaiModel(n_superpixels=9, base_channels=8, score_measure=["msgms", "l2"], calibration="score")
    assert every.image_score_channels == [0, 1]  # without a memory, every measure does


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
    assert torch.equal(fresh.memory.bank, with_memory.memory.bank)
    # An earlier version's memory (one bank per level) is left out: the memory is fitted again.
    legacy = {**without.state_dict(), "anomaly_map_generator.dissimilarity.memory.bank_0": torch.rand(5, 24)}
    fresh = SmaiModel(**args, score_measure=["msgms", "memory"])
    fresh.load_state_dict(legacy)
    assert not fresh.memory.is_fitted
