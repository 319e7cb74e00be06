"""Benchmark SMAI against anomalib's models on MVTec-layout data, the way an anomalib user would.

Every model is an anomalib ``AnomalibModule`` trained with ``Engine.fit`` and tested with
``Engine.test`` on ``MVTecAD(root, category)``; all share the seed, the data split, the batch
sizes and the metrics (image AUROC, pixel AUROC, PRO = AUPRO up to 30% FPR). Each model runs in
a fresh process, so its peak memory is its own. The output folder receives ``results.csv``,
``results.md``, ``roc_<category>.png`` (image-level ROC of all models) and
``montage_<category>.png`` (test images, SMAI's reconstruction, ground truth, SMAI's and the best peer's anomaly maps).

The peers use an ImageNet backbone that works offline, ``efficientnet_lite0_offline`` (see
:mod:`smai_plugin.backbone`); with internet access any other timm backbone (``resnet18``,
``wide_resnet50_2``, ...) works too.

What this adds over anomalib's own pipeline, ``anomalib benchmark`` (a grid of models and
categories with their defaults, in parallel on several GPUs): each model in a fresh process with
its own settings and budget, its own peak memory and CPU time; an offline ImageNet backbone for
the peers; Table 1's good- and defective-image accuracy; an ROC plot and an anomaly-map montage
per category. SMAI also runs inside ``anomalib benchmark`` itself, beside anomalib's models
(tests/test_anomalib_harness.py checks it).

Modules: :mod:`~smai_plugin.benchmark.config` (defaults, YAML, checks),
:mod:`~smai_plugin.benchmark.runner` (one model on one category in a fresh process),
:mod:`~smai_plugin.benchmark.memory` (the peak-memory meter),
:mod:`~smai_plugin.benchmark.report` (tables, notes, plots), :mod:`~smai_plugin.benchmark.cli`
(the command line).

Example:
    From a shell, the CPU preset on one category (about an hour on 2 cores)::

        nice -n 19 python -m smai_plugin.benchmark --config configs/benchmark_cpu.yaml
            --root ../shared/data --category bottle --output results/benchmark_bottle

    (one line), or ``smai-benchmark`` with the same arguments.

    From Python:

    >>> from smai_plugin.benchmark import main
    >>> main(["--config", "configs/benchmark_cpu.yaml", "--category", "grid"])  # doctest: +SKIP
    0

"""

from smai_plugin.backbone import OFFLINE_BACKBONE, efficientnet_lite0_offline

from .cli import main
from .config import DEFAULT_ROOT, check_category, load_config
from .report import COLUMNS
from .runner import table1_accuracy

__all__ = [
    "COLUMNS",
    "DEFAULT_ROOT",
    "OFFLINE_BACKBONE",
    "check_category",
    "efficientnet_lite0_offline",
    "load_config",
    "main",
    "table1_accuracy",
]
