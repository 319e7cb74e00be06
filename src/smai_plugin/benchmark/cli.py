"""The command line ``smai-benchmark`` (also ``python -m smai_plugin.benchmark``): every run in turn, logged.

Example:
    >>> _overrides(_parse_args(["--category", "bottle", "grid", "--smai-steps", "5"]))
    {'categories': ['bottle', 'grid'], 'model_configs': {'smai': {'init_args': {'max_steps': 5}}}}

"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .config import SMAI, as_image_size, check_category, load_config
from .report import COLUMNS, plot_montage, plot_roc, table_notes, write_tables
from .runner import RunFailedError, RunResult, RunSpec, run_isolated

__all__ = ["main"]

logger = logging.getLogger(__package__)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="smai-benchmark",
        description="Train and test SMAI and anomalib models on MVTec-layout categories; write tables and plots.",
    )
    parser.add_argument(
        "--config", type=Path, help="YAML config, e.g. configs/benchmark_cpu.yaml (without: GPU-sized defaults)"
    )
    parser.add_argument("--root", type=Path, help="dataset root holding the category folders")
    parser.add_argument("--category", nargs="+", action="extend", help="categories (several allowed)")
    parser.add_argument("--output", type=Path, help="output folder")
    parser.add_argument("--smai-steps", type=int, help="SMAI's training iterations (its max_steps)")
    parser.add_argument("--peer-epochs", type=int, help="training epochs of the other models")
    parser.add_argument("--models", nargs="+", help="subset of the configured models, e.g. smai padim")
    return parser.parse_args(argv)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for key, value in (
        ("root", args.root),
        ("categories", args.category),
        ("output", args.output),
        ("peer_epochs", args.peer_epochs),
        ("models", args.models),
    ):
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    if args.smai_steps is not None:
        overrides["model_configs"] = {SMAI: {"init_args": {"max_steps": args.smai_steps}}}
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the console script ``smai-benchmark``.

    Args:
        argv (Sequence[str] | None): Command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        int: ``0`` if every run succeeded, ``1`` otherwise.

    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = _parse_args(argv)
    config = load_config(args.config, _overrides(args))
    root, output = Path(config["root"]), Path(config["output"])
    for category in config["categories"]:
        check_category(root, category)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    work_root = output / "runs" if config["keep_runs"] else Path(tempfile.mkdtemp(prefix="smai_benchmark_"))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that `finally` removes the work folder

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for category in config["categories"]:
            results: dict[str, RunResult] = {}
            for name in config["models"]:
                result = _run_logged(_spec(config, name, category, work_root), rows)
                if result is not None:
                    results[name] = result
                write_tables(rows, output, table_notes(config, time.perf_counter() - started))
            if results:
                peers = [name for name in results if name != SMAI]
                best_peer = max(peers, key=lambda n: results[n].row["image_auroc"], default=None)
                plot_roc(results, category, output / f"roc_{category}.png")
                plot_montage(results, best_peer, category, output / f"montage_{category}.png", config["montage_rows"])
    finally:
        if not config["keep_runs"]:
            shutil.rmtree(work_root, ignore_errors=True)
    logger.info("Benchmark written to %s (%.0f s)", output, time.perf_counter() - started)
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into ``SystemExit`` so that clean-up code runs."""
    del frame
    sys.exit(128 + signum)


def _spec(config: dict[str, Any], name: str, category: str, work_root: Path) -> RunSpec:
    """Describe the run of model ``name`` on ``category`` under ``config``."""
    entry = config["model_configs"][name]
    return RunSpec(
        name=name,
        class_path=entry["class_path"],
        init_args=entry["init_args"],
        root=Path(config["root"]),
        category=category,
        image_size=as_image_size(config["image_size"]),
        seed=config["seed"],
        train_batch_size=config["train_batch_size"],
        eval_batch_size=config["eval_batch_size"],
        num_workers=config["num_workers"],
        val_split_mode=config["val_split_mode"],
        accelerator=config["accelerator"],
        max_epochs=None if name == SMAI else config["peer_epochs"],
        work_dir=work_root / category / name,
    )


def _run_logged(spec: RunSpec, rows: list[dict[str, Any]]) -> RunResult | None:
    """Run ``spec`` in a fresh process and append its row; a failure gives a failed row, not an exception."""
    logger.info("Benchmark: %s on %s ...", spec.name, spec.category)
    start = time.perf_counter()
    try:
        result = run_isolated(spec)
    except Exception as error:  # one failing model must not stop the others
        logger.error("Benchmark: %s on %s failed: %s", spec.name, spec.category, error)
        message = str(error) if isinstance(error, RunFailedError) else f"{type(error).__name__}: {error}"
        row = dict.fromkeys(COLUMNS, math.nan)
        row.update(category=spec.category, model=spec.name, budget="", image_size="", n_test="")
        row["status"] = "failed: " + message.splitlines()[0]
        rows.append(row)
        return None
    rows.append(result.row)
    logger.info("Benchmark: %s on %s done in %.0f s", spec.name, spec.category, time.perf_counter() - start)
    return result
