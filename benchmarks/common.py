"""What the benchmark scripts share: a config's model arguments, trained checkpoints rescored, a memory meter.

Every script builds SMAI from an anomalib CLI config (``configs/*.yaml``) and chooses its own
metrics, so the config's ``evaluator`` (a ``class_path`` spec, which only anomalib's CLI builds)
is left out. Scripts that compare scoring settings load one trained checkpoint with each (the
public, validated way to change how a trained model scores) through :func:`load_for_scoring`.

Example:
    >>> sorted(model_init_args("configs/smai_cpu.yaml", max_steps=5))[:3]
    ['base_channels', 'calibration', 'comparison']

"""

import threading
import time
from pathlib import Path
from typing import Any

import psutil
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


class PeakMemory:
    """Resident-set high-water mark, sampled every 10 ms in a thread while the block runs.

    ``peak_mib``: the peak above the level at entry (what the block itself added);
    ``peak_rss_mib``: the process's whole resident set at its peak.
    """

    def __enter__(self) -> "PeakMemory":
        self._process = psutil.Process()
        self._base = self._process.memory_info().rss
        self.peak_rss_mib = self._base / 2**20
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @property
    def peak_mib(self) -> float:
        return max(0.0, self.peak_rss_mib - self._base / 2**20)

    def _sample(self) -> None:
        while self._running:
            self.peak_rss_mib = max(self.peak_rss_mib, self._process.memory_info().rss / 2**20)
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()
        self.peak_rss_mib = max(self.peak_rss_mib, self._process.memory_info().rss / 2**20)
