"""What the benchmark scripts share: a config's model arguments, and trained checkpoints rescored.

Every script builds SMAI from an anomalib CLI config (``configs/*.yaml``) and chooses its own
metrics, so the config's ``evaluator`` (a ``class_path`` spec, which only anomalib's CLI builds)
is left out. Scripts that compare scoring settings load one trained checkpoint with each (the
public, validated way to change how a trained model scores) through :func:`load_for_scoring`.

Example:
    >>> sorted(model_init_args("configs/smai_cpu.yaml", max_steps=5))[:3]
    ['base_channels', 'calibration', 'comparison']

"""

from pathlib import Path
from typing import Any

import yaml
from anomalib.metrics import AUPRO, AUROC, Evaluator

from smai_plugin import Smai


def model_init_args(config: Path | str, **overrides: Any) -> dict[str, Any]:
    """The config's ``model.init_args`` without ``evaluator``, updated with ``overrides``."""
    init_args = dict(yaml.safe_load(Path(config).read_text())["model"]["init_args"])
    init_args.pop("evaluator", None)
    return {**init_args, **overrides}


def load_for_scoring(checkpoint: Path, **settings: Any) -> Smai:
    """Load a trained checkpoint with other scoring ``settings``, measured by image/pixel AUROC and PRO.

    The checkpoint's post-processor learnt its normalisation bounds for the training run's
    scoring; other settings' scores would be clamped to them. The metrics are rank-based, so
    they are taken on the raw scores (what validation on the test split, anomalib's default,
    would normalise without clamping).
    """
    model = Smai.load_from_checkpoint(checkpoint, map_location="cpu", **settings)
    model.post_processor = None
    model.evaluator = Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
        ]
    )
    return model
