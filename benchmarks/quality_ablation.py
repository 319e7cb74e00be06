"""Ablation of SMAI's detection-quality levers on one real category, in one run.

Trains three models with the same seed and data: the CPU preset (``--config``, windowed crops),
the same preset trained on whole images for the paper's leave-one-out schedule, and the preset
with the earlier budget (``--short-steps`` iterations). Every scoring variant is then a trained
checkpoint loaded with other inference settings (``Smai.load_from_checkpoint(path, **settings)``:
score measure, comparison, calibration, image score), calibrated again on the training images
where it calibrates, and tested through ``Engine.test``: image AUROC, pixel AUROC, PRO, good- and
defect-image accuracy at anomalib's adaptive threshold, and seconds per test image. Example (the
README's table)::

    python benchmarks/quality_ablation.py --root ../shared/data --category bottle
"""

import json
import time
from pathlib import Path
from typing import Any

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.metrics.threshold.f1_adaptive_threshold import _F1AdaptiveThreshold
from common import data_init_args, load_for_scoring, markdown_table, model_init_args, script_parser
from lightning import Callback, seed_everything

from smai_plugin import Smai

PAPER = {
    "scoring": "leave_one_out",
    "score_measure": "ssim",
    "comparison": "per_pass",
    "calibration": "none",
    "top_k_fraction": 0,
}
EARLIER = {"score_measure": "ssim", "comparison": "per_pass", "calibration": "none", "top_k_fraction": 0}
# The earlier default scoring (MSGMS and features of the reconstruction) with the maximum of the map as image score.
COMBINED = {
    "score_measure": ["msgms", "features"],
    "comparison": "reconstruction",
    "calibration": "score",
    "top_k_fraction": 0,
}
WITH_MEMORY = {**COMBINED, "score_measure": ["msgms", "memory"], "top_k_fraction": 0.01}
# name: (training, inference settings). Trainings: "preset" (the config), "paper" (whole
# images, leave-one-out), "short" (the config with --short-steps iterations).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "paper: leave-one-out, ssim, per pass, no calibration": ("paper", PAPER),
    "earlier default: windowed, ssim, per pass, no calibration, short training": ("short", EARLIER),
    "longer training alone": ("preset", EARLIER),
    "+ calibration of the score alone": ("preset", {**EARLIER, "calibration": "score"}),
    "+ calibration of the map alone": ("preset", {**EARLIER, "calibration": "map"}),
    "+ reconstruction alone": ("preset", {**EARLIER, "comparison": "reconstruction"}),
    "+ top-1% image score alone": ("preset", {**EARLIER, "top_k_fraction": 0.01}),
    "msgms alone": ("preset", {**EARLIER, "score_measure": "msgms"}),
    "features alone (needs the reconstruction)": (
        "preset",
        {**COMBINED, "score_measure": "features", "calibration": "none"},
    ),
    "msgms, per pass, calibrated score": ("preset", {**COMBINED, "score_measure": "msgms", "comparison": "per_pass"}),
    "msgms, reconstruction, calibrated score": ("preset", {**COMBINED, "score_measure": "msgms"}),
    "features, reconstruction, calibrated score": ("preset", {**COMBINED, "score_measure": "features"}),
    "msgms + features, reconstruction, calibrated map": ("preset", {**COMBINED, "calibration": "map"}),
    "msgms + features, reconstruction, calibrated score": ("preset", COMBINED),
    "+ top-1% image score: the earlier default": ("preset", {**COMBINED, "top_k_fraction": 0.01}),
    "msgms + features, reconstruction, calibrated score, short training": ("short", COMBINED),
    "memory alone, calibrated score, top-1%": ("preset", {**WITH_MEMORY, "score_measure": "memory"}),
    "msgms + features + memory, calibrated score, top-1%": (
        "preset",
        {**WITH_MEMORY, "score_measure": ["msgms", "features", "memory"]},
    ),
    "msgms + memory, calibrated score, top-1%: the default": ("preset", WITH_MEMORY),
}


class TestOutputs(Callback):
    """Keeps the test batches' scores and labels, and times the test batches."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.seconds = 0.0

    def on_test_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_test_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any, **kwargs: Any) -> None:
        self.seconds += time.perf_counter() - self._start
        self.scores.append(outputs.pred_score.float().reshape(-1).cpu())
        self.labels.append(outputs.gt_label.int().reshape(-1).cpu())

    def accuracies(self) -> tuple[float, float]:
        """Good- and defect-image accuracy at anomalib's F1-adaptive threshold on these scores.

        With ``val_split_mode="same_as_test"`` (anomalib's default) that is the threshold
        validation fits on the same images; fitting it here saves a validation pass per variant.
        """
        scores, labels = torch.cat(self.scores), torch.cat(self.labels)
        threshold_metric = _F1AdaptiveThreshold()
        threshold_metric.update(scores, labels)
        predicted = scores >= threshold_metric.compute()
        return float((~predicted[labels == 0]).float().mean()), float(predicted[labels == 1].float().mean())


def train(
    config_path: Path, settings: dict[str, Any], datamodule: MVTecAD, work: Path, seed: int
) -> tuple[Path, float]:
    """Train the config's model with ``settings`` changed; return its checkpoint and training seconds."""
    seed_everything(seed, workers=True)
    model = Smai(**model_init_args(config_path, **settings))
    engine = Engine(default_root_dir=work, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    path = work / "model.ckpt"
    engine.trainer.save_checkpoint(path)
    return path, seconds


def evaluate(checkpoint: Path, settings: dict[str, Any], datamodule: MVTecAD, work: Path) -> dict[str, float]:
    """Test a checkpoint with other inference settings; calibrates again first where it calibrates."""
    model = load_for_scoring(checkpoint, **settings)
    outputs = TestOutputs()
    engine = Engine(
        default_root_dir=work,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=[outputs],
    )
    start = time.perf_counter()
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    total = time.perf_counter() - start
    good, defect = outputs.accuracies()
    n_images = len(datamodule.test_data)
    return {
        "image_auroc": metrics["image_AUROC"],
        "pixel_auroc": metrics["pixel_AUROC"],
        "pro": metrics["pixel_AUPRO"],
        "good_acc": good,
        "defect_acc": defect,
        "s_per_image": outputs.seconds / n_images,
        "calibration_s": total - outputs.seconds,
    }


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--short-steps", type=int, default=300, help="the earlier CPU preset's iterations")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", type=Path, default=Path("results/quality_ablation"))
    args = parser.parse_args()

    data_args = data_init_args(args.config)
    datamodule = MVTecAD(
        root=args.root,
        category=args.category,
        train_batch_size=data_args.get("train_batch_size", 8),
        eval_batch_size=data_args.get("eval_batch_size", 8),
        num_workers=data_args.get("num_workers", 0),
        seed=args.seed,
    )
    trainings = {"preset": {}, "paper": PAPER, "short": {**EARLIER, "max_steps": args.short_steps}}
    checkpoints, train_seconds = {}, {}
    for name, settings in trainings.items():
        checkpoints[name], train_seconds[name] = train(args.config, settings, datamodule, args.output / name, args.seed)
        print(f"trained {name}: {train_seconds[name]:.0f} s", flush=True)
    rows = []
    for name, (training, settings) in VARIANTS.items():
        row = {
            "variant": name,
            "training": training,
            **evaluate(checkpoints[training], settings, datamodule, args.output),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    steps = model_init_args(args.config)["max_steps"]
    summary = {"category": args.category, "config": str(args.config), "train_seconds": train_seconds, "rows": rows}
    (args.output / "ablation.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{args.category}; training (s): {train_seconds}; preset {steps} iterations, short {args.short_steps}")
    columns = ["variant", "training", "image AUROC", "pixel AUROC", "PRO", "good acc.", "defect acc.", "s/image"]
    digits = {"image_auroc": 3, "pixel_auroc": 3, "pro": 3, "good_acc": 2, "defect_acc": 2, "s_per_image": 2}
    cells = [[row["variant"], row["training"], *(f"{row[key]:.{n}f}" for key, n in digits.items())] for row in rows]
    print(markdown_table(columns, cells))


if __name__ == "__main__":
    main()
