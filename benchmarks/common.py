"""What the benchmark scripts share: their common options, a config's model arguments, trained checkpoints rescored.

Every script builds SMAI from an anomalib CLI config (``configs/*.yaml``) and chooses its own
metrics, so the config's ``evaluator`` (a ``class_path`` spec, which only anomalib's CLI builds)
is left out. Scripts that compare scoring settings load one trained checkpoint with each (the
public, validated way to change how a trained model scores) through :func:`load_for_scoring`.
The memory meter (``PeakMemory``) and the Markdown tables (``markdown_table``, ``format_cell``) are the
``smai-benchmark`` harness's own (:mod:`smai_plugin.benchmark`).

Example:
    >>> sorted(model_init_args("configs/smai_cpu.yaml", max_steps=5))[:3]
    ['base_channels', 'calibration', 'comparison']

"""

import argparse
from pathlib import Path
from typing import Any

import yaml

from smai_plugin import Smai
from smai_plugin.benchmark.config import DEFAULT_ROOT
from smai_plugin.benchmark.memory import PeakMemory
from smai_plugin.benchmark.report import format_cell, markdown_table
from smai_plugin.benchmark.runner import evaluator

__all__ = [
    "PeakMemory",
    "data_init_args",
    "format_cell",
    "load_for_scoring",
    "markdown_table",
    "model_init_args",
    "script_parser",
]


def script_parser(description: str, config_help: str = "anomalib CLI config of SMAI") -> argparse.ArgumentParser:
    """An argument parser with the options every script takes: ``--config``, ``--root``, ``--category``.

    ``description`` is shown as written (the script's docstring, with its examples).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/smai_cpu.yaml"), help=config_help)
    root_help = "dataset root holding the category folders, MVTec AD layout (default: %(default)s)"
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=root_help)  # argparse makes it a Path
    parser.add_argument("--category", default="bottle", help="category folder under --root (default: %(default)s)")
    return parser


def _init_args(config: Path | str, section: str) -> dict[str, Any]:
    """A copy of the config's ``<section>.init_args``."""
    return dict(yaml.safe_load(Path(config).read_text())[section]["init_args"])


def model_init_args(config: Path | str, **overrides: Any) -> dict[str, Any]:
    """The config's ``model.init_args`` without ``evaluator``, updated with ``overrides``."""
    init_args = _init_args(config, "model")
    init_args.pop("evaluator", None)
    return {**init_args, **overrides}


def data_init_args(config: Path | str) -> dict[str, Any]:
    """The config's ``data.init_args`` (batch sizes, workers), for scripts that build their own datamodule."""
    return _init_args(config, "data")


def load_for_scoring(checkpoint: Path, **settings: Any) -> Smai:
    """Load a trained checkpoint with other scoring ``settings``, measured by image/pixel AUROC and PRO.

    The checkpoint's post-processor learnt its normalisation bounds for the training run's
    scoring; other settings' scores would be clamped to them. The metrics are rank-based, so
    they are taken on the raw scores (what validation on the test split, anomalib's default,
    would normalise without clamping). The metrics are the ``smai-benchmark`` harness's.
    """
    model = Smai.load_from_checkpoint(checkpoint, map_location="cpu", **settings)
    model.post_processor = None
    model.evaluator = evaluator()
    return model
