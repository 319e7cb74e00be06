"""Which of SMAI's detection levers hold across categories: each alone, from the same trained checkpoints.

For every category one trained SMAI checkpoint (``smai-benchmark`` keeps them with ``keep_runs:
true``, under ``<output>/runs/<category>/smai``) is loaded once per lever with that lever's
settings (``Smai.load_from_checkpoint(path, **settings)``), calibrated on the category's training
images (feature memory and normal statistics, the package's own code) and tested on its test
images: image AUROC, pixel AUROC and PRO (AUPRO up to 30% false positives), anomalib's metrics.
The inpainting does not depend on these levers, so each image is inpainted once and its
comparison maps reused by every lever (a lever that changes how the inpainting is compared,
e.g. ``score_measure``, changes what is computed from them, never the inpainting itself).

Two levers are not settings of the package: ``global calibration`` replaces the per-pixel normal
statistics with one mean and spread per measure over all pixels (for parts that are not aligned
from image to image), to measure whether the per-pixel statistics hold; ``map: the measures'
average`` replaces the default's combination (the memory's map plus the inpainting's excess over
its normal level, :meth:`SmaiModel.combine`) with the plain average of both on that scale.

Example (the docs' table; ``--settings`` loads checkpoints of another preset with these settings)::

    python benchmarks/quality_ablation.py --runs results/benchmark/runs --root ../shared/data \\
        --category bottle grid hazelnut_toy magnetic_tile ball_screw_drive
"""

import argparse
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from anomalib.data import MVTecAD
from anomalib.metrics.aupro import _AUPRO
from common import markdown_table
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc

from smai_plugin import Smai

# Each lever alone, against the checkpoint's own settings (the default preset's).
LEVERS: dict[str, dict[str, Any]] = {
    "default": {},
    "image score from every measure": {"image_score_measure": ["msgms", "memory"]},
    "memory: random sample instead of coreset": {"memory_sampling": "random"},
    "memory: no neighbourhood aggregation": {"memory_neighbourhood": 1},
    "memory: the 3x3 average alone (PatchCore's patch)": {"memory_neighbourhood": 3},
    "memory: no dilation": {"memory_dilation": 1},
    "memory: the 3x3 average alone, no dilation (before)": {"memory_neighbourhood": 3, "memory_dilation": 1},
    "memory: never whitened": {"memory_whitening": False},
    "memory: always whitened": {"memory_whitening": True},
    "memory of 1024 patches": {"memory_size": 1024},
    "memory of 16384 patches": {"memory_size": 16384},
    "everything at 128 px (memory too)": {"image_size": [128, 128], "inpaint_size": None},
    "calibrated map (standardised per pixel)": {"calibration": "map"},
    "global calibration (one normal distribution per measure)": {"global_calibration": True},
    "map: the measures' average (inpainting counted below its normal level too)": {"average_map": True},
    "memory alone (no inpainting)": {"score_measure": "memory"},
    "inpainting alone (msgms)": {"score_measure": "msgms"},
    "inpaint the 8 superpixels the memory ranks highest": {"inpainted_superpixels": 8},
    "inpaint the 4 superpixels the memory ranks highest": {"inpainted_superpixels": 4},
    "inpaint the 2 superpixels the memory ranks highest": {"inpainted_superpixels": 2},
    "SLIC: 5 iterations": {"slic_iterations": 5},
    "SLIC: 3 iterations": {"slic_iterations": 3},
}


class CachedComparison(nn.Module):
    """Stands in for the model's ``anomaly_map_generator``: each batch of images is inpainted once.

    Keyed by the bytes of the batch it is given (the inpainting's input) and of the passes' holes,
    so that every lever that inpaints the same images the same way gets the same maps without
    running PEN-Net again.
    """

    def __init__(self, inner: nn.Module, cache: dict[str, Any]) -> None:
        super().__init__()
        self.inner, self.cache = inner, cache

    def compare(self, generator: nn.Module, images: torch.Tensor, holes: torch.Tensor, *args: Any) -> tuple:
        key = hashlib.sha1(images.numpy().tobytes() + holes.numpy().tobytes()).hexdigest()
        key += str([m.value for m in self.inner.measures]) + str(args)
        if key not in self.cache:
            self.cache[key] = self.inner.compare(generator, images, holes, *args)
        return self.cache[key]


def cache_memory(memory: nn.Module, key: str, cache: dict[str, tuple[torch.Tensor, ...]]) -> None:
    """Fit the memory once per key (its settings and image size): the greedy coreset is the slow part."""
    fit = memory.fit

    def cached_fit(embeddings: Iterator[torch.Tensor]) -> None:
        if key not in cache:
            fit(embeddings)
            cache[key] = memory.bank, memory.source, memory.centre, memory.whiten
        memory.bank, memory.source, memory.centre, memory.whiten = cache[key]

    memory.fit = cached_fit


def batches(model: Smai, dataset: Any) -> Iterator[tuple[torch.Tensor, Any]]:
    """The dataset's images (and masks) as the model scores them: through its pre-processor, 8 at a time."""
    loader = DataLoader(dataset, batch_size=8, shuffle=False, collate_fn=dataset.collate_fn)
    for batch in loader:
        masks = batch.gt_mask if batch.gt_mask is not None else torch.zeros_like(batch.image[:, 0])
        yield model.pre_processor.transform(batch.image, masks), batch.gt_label


def globalise(model: Smai) -> None:
    """Replace the per-pixel normal statistics with one mean and spread per measure over all pixels."""
    statistics = model.model.normal_statistics
    mean = statistics.mean.mean(dim=(2, 3), keepdim=True)
    variance = (statistics.spread.square() + statistics.mean.square()).mean(dim=(2, 3), keepdim=True) - mean.square()
    statistics.mean = mean.expand_as(statistics.mean).contiguous()
    statistics.spread = variance.clamp(min=0).sqrt().expand_as(statistics.spread).contiguous()


@torch.no_grad()
def evaluate(checkpoint: Path, settings: dict[str, Any], data: MVTecAD, cache: dict[str, Any]) -> tuple:
    """Image AUROC, pixel AUROC and PRO of the checkpoint with ``settings``, calibrated on its training images."""
    settings = dict(settings)
    global_calibration = settings.pop("global_calibration", False)
    average_map = settings.pop("average_map", False)
    model = Smai.load_from_checkpoint(checkpoint, map_location="cpu", **settings).eval()
    if "image_size" in settings:  # anomalib restores the checkpoint's pre-processor, whatever image_size says
        model.pre_processor = model.configure_pre_processor(tuple(settings["image_size"]))
    torch_model = model.model
    if torch_model.anomaly_map_generator is not None:
        torch_model.anomaly_map_generator = CachedComparison(torch_model.anomaly_map_generator, cache)
    if torch_model.memory is not None:
        memory = torch_model.memory
        # The bank does not depend on the dilation (applied to distances after the search).
        key = str((memory.size, memory.sampling, memory.neighbourhood, memory.whitening, settings.get("image_size")))
        cache_memory(memory, key, cache)
    torch_model.calibrate([images for (images, _), _ in batches(model, data.train_data)])
    if global_calibration:
        globalise(model)
    if average_map:
        torch_model.combine = lambda scaled: scaled.mean(dim=1, keepdim=True)
    scores, labels, maps, masks = [], [], [], []
    for (images, gt_masks), gt_labels in batches(model, data.test_data):
        output = torch_model(images)
        scores.append(output.pred_score)
        labels.append(gt_labels.int())
        maps.append(output.anomaly_map[:, 0])
        masks.append(gt_masks.reshape(maps[-1].shape).int())
    scores, labels, maps, masks = map(torch.cat, (scores, labels, maps, masks))
    pro = _AUPRO(fpr_limit=0.3)
    pro.update(maps, masks)
    return (
        float(binary_auroc(scores, labels)),
        float(binary_auroc(maps.flatten(), masks.flatten())),
        float(pro.compute()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="smai-benchmark's <output>/runs (keep_runs: true)")
    parser.add_argument("--root", type=Path, required=True, help="dataset root, MVTec AD layout")
    parser.add_argument("--category", nargs="+", required=True)
    parser.add_argument("--settings", type=json.loads, default={}, help="JSON settings every checkpoint loads with")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), help="a subset of the levers, by name")
    parser.add_argument("--output", type=Path, default=Path("results/quality_ablation.json"))
    args = parser.parse_args()

    results: dict[str, dict[str, tuple]] = {}
    for category in args.category:
        checkpoint = next((args.runs / category / "smai").rglob("model.ckpt"))
        data = MVTecAD(root=args.root, category=category, num_workers=0)
        data.setup()
        cache: dict[str, torch.Tensor] = {}
        for lever in args.levers:
            metrics = evaluate(checkpoint, {**args.settings, **LEVERS[lever]}, data, cache)
            results.setdefault(lever, {})[category] = metrics
            print(f"{category:18s} {lever:58s} " + " / ".join(f"{value:.3f}" for value in metrics), flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))
    columns = ["lever (alone)", *args.category]
    rows = [
        [lever, *(" / ".join(f"{v:.3f}" for v in per[c]) if c in per else "" for c in args.category)]
        for lever, per in results.items()
    ]
    print("\nimage AUROC / pixel AUROC / PRO\n" + markdown_table(columns, rows))


if __name__ == "__main__":
    main()
