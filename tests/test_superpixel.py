"""The torch SLIC masker: shape contract, and agreement with scikit-image on real images."""

import numpy as np
import pytest
import torch
from skimage.segmentation import find_boundaries, slic

from smai_plugin.superpixel import SuperpixelCache, SuperpixelMasker, nearest_candidate, superpixel_grid

from .conftest import real_image


def boundary_recall(labels: np.ndarray, reference: np.ndarray, tolerance: int = 2) -> float:
    """Share of the reference's boundary pixels that lie within ``tolerance`` of a boundary of ``labels``."""
    from scipy.ndimage import binary_dilation

    ours = binary_dilation(find_boundaries(labels, mode="inner"), iterations=tolerance)
    ref = find_boundaries(reference, mode="inner")
    return float((ours & ref).sum() / ref.sum())


def undersegmentation_error(labels: np.ndarray, reference: np.ndarray) -> float:
    """Corrected undersegmentation error (Neubert and Protzel): leak of each segment out of its best reference."""
    leak = 0
    for label in np.unique(labels):
        _, counts = np.unique(reference[labels == label], return_counts=True)
        leak += counts.sum() - counts.max()
    return leak / labels.size


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize(
    ("category", "split", "index"),
    [("hazelnut_toy", "train", 3), ("hazelnut_toy", "test", 5), ("ball_screw_drive", "train", 0)],
)
def test_agrees_with_skimage_on_real_images(category: str, split: str, index: int) -> None:
    image = real_image(category, split, index)
    masker = SuperpixelMasker(n_superpixels=77, compactness=10.0, slic_iterations=10)
    ours = masker.labels(to_tensor(image))[0].numpy()
    reference = slic(image, n_segments=77, compactness=10.0, max_num_iter=10, start_label=0)
    # Baseline: the plain grid partition SLIC starts from. Ours must follow skimage's
    # boundaries far better than it (on a surface with few edges, skimage's segments are
    # near-grid themselves, so the leak bound is absolute).
    rows, cols = superpixel_grid(77, *image.shape[:2])
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    grid = (yy * rows // image.shape[0]) * cols + xx * cols // image.shape[1]
    recall, grid_recall = boundary_recall(ours, reference), boundary_recall(grid, reference)
    assert recall >= 0.55
    assert recall >= grid_recall + 0.1
    assert undersegmentation_error(ours, reference) <= 0.32


def test_the_export_segments_each_image_of_a_dynamic_batch_in_a_loop_with_the_eager_labels(tmp_path) -> None:
    import onnx
    import onnxruntime
    import openvino

    class Labels(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return SuperpixelMasker(n_superpixels=40).labels(images)

    images = torch.cat(
        [
            to_tensor(real_image(category, "test", index, size=96))
            for category, index in [("hazelnut_toy", 5), ("ball_screw_drive", 0), ("hazelnut_toy", 1)]
        ]
    )
    path = tmp_path / "slic.onnx"
    torch.onnx.export(
        Labels(),
        (images[:2],),
        path,
        dynamo=True,
        opset_version=18,
        optimize=False,
        input_names=["images"],
        dynamic_axes={"images": {0: "batch"}},
    )
    assert any(node.op_type == "Scan" for node in onnx.load(path).graph.node)  # the loop over the batch
    eager = Labels()(images).numpy()
    compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    session = onnxruntime.InferenceSession(path)
    for batch in (images[:1], images):  # one image and a batch of another size than the traced one
        expected = eager[: len(batch)]
        for labels in (compiled({0: batch.numpy()})[0], session.run(None, {"images": batch.numpy()})[0]):
            assert labels.shape == expected.shape
            # float32 sums in another order may move a pixel on a near tie between two centres
            assert (labels != expected).mean() < 1e-3


def test_masks_partition_the_image_with_fixed_count() -> None:
    images = to_tensor(real_image("hazelnut_toy", "train", 0, size=128)).repeat(2, 1, 1, 1)
    masks = SuperpixelMasker(n_superpixels=40)(images)
    assert masks.shape == (2, 40, 128, 128)
    assert torch.equal(masks.sum(1), torch.ones(2, 128, 128))
    rows, cols = superpixel_grid(40, 128, 128)
    assert (masks.flatten(2).sum(2) > 0).sum(1).le(rows * cols).all()
    assert torch.equal(masks[0], masks[1])  # batched images are segmented independently and alike


def test_nearest_candidate_is_argmin_with_its_choice_among_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    # Distances from few values, so that most pixels have tied candidates; argmin takes the first.
    distance = torch.randint(0, 3, (2, 9, 500), generator=generator).float()
    candidates = torch.randperm(9 * 500, generator=generator).reshape(9, 500)
    expected = torch.gather(candidates.expand(2, -1, -1), 1, distance.argmin(1, keepdim=True)).squeeze(1)
    assert (distance.min(1, keepdim=True).values == distance).sum(1).gt(1).float().mean() > 0.5  # ties are common
    assert torch.equal(nearest_candidate(distance, candidates), expected)


class CountingMasker(SuperpixelMasker):
    """A real masker that counts the images it segments."""

    segmented = 0

    def labels(self, images: torch.Tensor) -> torch.Tensor:
        self.segmented += len(images)
        return super().labels(images)


def test_cache_segments_each_image_once_and_gives_the_masker_labels() -> None:
    images = torch.stack([to_tensor(real_image("hazelnut_toy", "train", index, size=64))[0] for index in range(3)])
    masker = CountingMasker(n_superpixels=16)
    cache = SuperpixelCache(masker)
    first = cache(images[:2])
    assert torch.equal(first, masker(images[:2]))
    masker.segmented = 0
    # A batch mixing seen and new images (a training epoch's reshuffle): only the new one is segmented.
    mixed = cache(images[[2, 0, 1]])
    assert masker.segmented == 1
    assert torch.equal(mixed, masker(images[[2, 0, 1]]))
    assert len(cache) == 3
    # A changed pixel is a new image; so is the same image under other SLIC settings.
    changed = images[:1].clone()
    changed[0, :, 0, 0] = 1 - changed[0, :, 0, 0]
    masker.segmented = 0
    cache(changed)
    masker.compactness = 20.0
    cache(images[:1])
    assert masker.segmented == 2


def test_cache_keeps_no_more_than_its_byte_budget() -> None:
    images = torch.rand(3, 3, 64, 64)
    masker = CountingMasker(n_superpixels=16, slic_iterations=2)
    cache = SuperpixelCache(masker, max_bytes=2 * 64 * 64)  # uint8 labels: room for two images
    cache(images)
    assert len(cache) == 2
    masker.segmented = 0
    labels = cache.labels(images)
    assert masker.segmented == 1  # the image past the budget, every time
    assert torch.equal(labels, masker.labels(images))


def test_grid_never_exceeds_requested_count() -> None:
    for count, height, width in [(77, 256, 256), (1, 64, 64), (10, 64, 256), (500, 128, 64)]:
        rows, cols = superpixel_grid(count, height, width)
        assert 1 <= rows * cols <= count


@pytest.mark.parametrize("kwargs", [{"n_superpixels": 0}, {"compactness": 0.0}, {"slic_iterations": 0}])
def test_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SuperpixelMasker(**kwargs)
