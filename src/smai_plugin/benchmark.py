"""Benchmark SMAI against anomalib's models on MVTec-layout data, the way an anomalib user would.

Every model is an anomalib ``AnomalibModule`` trained with ``Engine.fit`` and tested with
``Engine.test`` on ``MVTecAD(root, category)``; all share the seed, the data split, the batch
sizes and the metrics (image AUROC, pixel AUROC, PRO = AUPRO up to 30% FPR). Each model runs in
a fresh process, so its peak memory is its own. The output folder receives ``results.csv``,
``results.md``, ``roc_<category>.png`` (image-level ROC of all models) and
``montage_<category>.png`` (test images, ground truth, SMAI's and the best peer's anomaly maps).

The peers use an ImageNet backbone that works offline, ``efficientnet_lite0_offline`` (see
:mod:`smai_plugin.backbone`); with internet access any other timm backbone (``resnet18``,
``wide_resnet50_2``, ...) works too.

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

from __future__ import annotations

import argparse
import copy
import csv
import importlib
import logging
import math
import multiprocessing
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from .backbone import OFFLINE_BACKBONE, efficientnet_lite0_offline

logger = logging.getLogger("smai_plugin.benchmark")

__all__ = ["OFFLINE_BACKBONE", "efficientnet_lite0_offline", "load_config", "main", "table1_accuracy"]

SMAI = "smai"  # the name of SMAI's entry in the config's ``model_configs``

COLUMNS = [
    "category",
    "model",
    "image_auroc",
    "pixel_auroc",
    "pro",
    "good_acc",
    "defect_acc",
    "mean_acc",
    "train_time_s",
    "infer_ms_per_image",
    "cpu_time_s",
    "peak_rss_mb",
    "baseline_rss_mb",
    "budget",
    "image_size",
    "n_test",
    "status",
]

# Defaults when no --config is given: the paper's SMAI (50,000 steps, 256 px) and anomalib's
# PatchCore coreset (10%), i.e. GPU-sized; configs/benchmark_cpu.yaml is the CPU preset.
DEFAULT_CONFIG: dict[str, Any] = {
    "root": "./datasets/MVTecAD",
    "categories": ["bottle"],
    "output": "results/benchmark",
    "seed": 42,
    "image_size": 256,
    "train_batch_size": 8,
    "eval_batch_size": 8,
    "num_workers": 0,
    "val_split_mode": "same_as_test",
    "accelerator": "auto",
    "peer_epochs": 1,
    "montage_rows": 6,
    "keep_runs": False,
    "models": [SMAI, "patchcore", "padim"],
    "model_configs": {
        SMAI: {"class_path": "smai_plugin.Smai", "preset": None, "init_args": {}},
        "patchcore": {
            "class_path": "anomalib.models.Patchcore",
            "init_args": {
                "backbone": OFFLINE_BACKBONE,
                "layers": ["blocks.2", "blocks.4"],
                "coreset_sampling_ratio": 0.1,
            },
        },
        "padim": {
            "class_path": "anomalib.models.Padim",
            "init_args": {"backbone": OFFLINE_BACKBONE, "layers": ["blocks.2", "blocks.4"], "n_features": 100},
        },
        "draem": {"class_path": "anomalib.models.Draem", "init_args": {"dtd_dir": "auto"}},
    },
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Built-in defaults, updated by a YAML file, then by ``overrides``; checked.

    A model entry may name an anomalib CLI config in ``preset`` (relative paths are resolved
    against the YAML file's folder); its ``model.init_args`` become the entry's defaults.

    Args:
        path (Path | str | None): YAML file, or ``None`` for the defaults.
        overrides (dict[str, Any] | None): Values that win over the file's (deep-merged).

    Returns:
        dict[str, Any]: The configuration, with each model's ``init_args`` complete.

    Raises:
        FileNotFoundError: If the YAML file or a preset does not exist.
        ValueError: If a key or a value is invalid.

    Example:
        >>> config = load_config(overrides={"models": ["padim"], "image_size": 64})
        >>> config["model_configs"]["padim"]["init_args"]["backbone"]
        'efficientnet_lite0_offline'

    """
    base_dir = Path.cwd()
    config = DEFAULT_CONFIG
    if path is not None:
        path = Path(path)
        if not path.is_file():
            msg = f"Benchmark config {path} does not exist."
            raise FileNotFoundError(msg)
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            msg = f"Benchmark config {path} must be a YAML mapping, got {type(loaded).__name__}."
            raise ValueError(msg)
        config = _merge(config, loaded)
        base_dir = path.resolve().parent
    config = _merge(config, overrides or {})

    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        msg = f"Unknown benchmark config keys {unknown}; known: {sorted(DEFAULT_CONFIG)}."
        raise ValueError(msg)
    if isinstance(config["categories"], str):
        config["categories"] = [config["categories"]]
    missing = [name for name in config["models"] if name not in config["model_configs"]]
    if missing or not config["models"]:
        msg = f"Unknown or no models {missing or config['models']}; configured: {sorted(config['model_configs'])}."
        raise ValueError(msg)
    _image_size(config["image_size"])
    for key in ("peer_epochs", "train_batch_size", "eval_batch_size"):
        if not isinstance(config[key], int) or config[key] < 1:
            msg = f"{key} must be a positive integer, got {config[key]!r}."
            raise ValueError(msg)

    for name, entry in config["model_configs"].items():
        if "class_path" not in entry:
            msg = f"Model '{name}' needs a class_path (e.g. anomalib.models.Padim)."
            raise ValueError(msg)
        preset = entry.get("preset")
        init_args = dict(entry.get("init_args") or {})
        if preset:
            preset_path = Path(preset) if Path(preset).is_absolute() else base_dir / preset
            if not preset_path.is_file():
                msg = f"Preset {preset_path} of model '{name}' does not exist."
                raise FileNotFoundError(msg)
            preset_args = (yaml.safe_load(preset_path.read_text()) or {}).get("model", {}).get("init_args", {})
            preset_args.pop("evaluator", None)  # every model is tested with the benchmark's own evaluator
            init_args = {**preset_args, **init_args}
        entry["init_args"] = init_args
    return config


def _image_size(value: int | Sequence[int]) -> tuple[int, int]:
    """``256`` or ``[256, 256]`` as a ``(height, width)`` tuple of positive integers."""
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
        msg = f"image_size must be a positive integer or [height, width], got {value!r}."
        raise ValueError(msg)
    return size


def check_category(root: Path, category: str) -> None:
    """Raise a clear error unless ``root/category`` is an MVTec-layout category folder.

    Args:
        root (Path): Dataset root.
        category (str): Category folder name.

    Raises:
        FileNotFoundError: If ``train/good`` or ``test`` is missing.

    Example:
        >>> check_category(Path("/nowhere"), "bottle")
        Traceback (most recent call last):
        ...
        FileNotFoundError: Category 'bottle' not found: /nowhere/bottle/train/good does not exist ...

    """
    folder = root / category
    for needed in (folder / "train" / "good", folder / "test"):
        if not needed.is_dir():
            found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir()) if root.is_dir() else []
            msg = (
                f"Category '{category}' not found: {needed} does not exist "
                f"(expected MVTec AD layout; categories under {root}: {found or 'none'})."
            )
            raise FileNotFoundError(msg)


# --------------------------------------------------------------------------------------------
# One model on one category, in its own process
# --------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """Everything a fresh process needs to train and test one model on one category."""

    name: str
    class_path: str
    init_args: dict[str, Any]
    root: Path
    category: str
    image_size: tuple[int, int]
    seed: int
    train_batch_size: int
    eval_batch_size: int
    num_workers: int
    val_split_mode: str
    accelerator: str
    max_epochs: int | None
    work_dir: Path


@dataclass
class RunResult:
    """A CSV row and the per-image test outputs (for the ROC curves and the montage)."""

    row: dict[str, Any]
    image_paths: list[str] = field(default_factory=list)
    gt_labels: np.ndarray | None = None
    gt_masks: np.ndarray | None = None
    pred_scores: np.ndarray | None = None
    pred_labels: np.ndarray | None = None
    anomaly_maps: np.ndarray | None = None


class _Recorder(Callback):
    """Times validation and test batches, keeps the test outputs, logs progress.

    Trainer callbacks run before the model's own (pre-processor, post-processor, evaluator), so
    a batch's time covers pre-processing and the forward pass; the kept outputs are the very
    objects the post-processor then normalises and thresholds in place.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.val_seconds = 0.0
        self.test_seconds = 0.0
        self.outputs: list[Any] = []
        self._start = 0.0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger.info("%s: epoch %d done (global step %d)", self.label, trainer.current_epoch, trainer.global_step)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger.info("%s: validation (fits the thresholds and normalisation)", self.label)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger.info("%s: test", self.label)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args, **kwargs) -> None:
        self._start = time.perf_counter()

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args, **kwargs) -> None:
        self.val_seconds += time.perf_counter() - self._start

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args, **kwargs) -> None:
        self._start = time.perf_counter()

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args, **kwargs) -> None:
        self.test_seconds += time.perf_counter() - self._start
        self.outputs.append(outputs)


def _evaluator() -> Any:
    """Build the metrics every model is tested with: image AUROC, pixel AUROC, PRO (AUPRO, 30% FPR)."""
    from anomalib.metrics import AUPRO, AUROC, Evaluator

    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
        ],
    )


def _import(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        msg = f"Cannot import model class '{class_path}': {error}"
        raise ImportError(msg) from error


def _local_anomaly_source(root: Path, category: str, folder: Path) -> Path:
    """Link the ``train/good`` images of the other categories into ``folder`` (DRAEM's textures).

    DRAEM pastes textures into normal images to fake anomalies; anomalib downloads the DTD
    texture set for this, which fails offline. Normal images of other categories serve instead.
    """
    folder.mkdir(parents=True, exist_ok=True)
    others = [p for p in sorted(root.iterdir()) if p.name != category and (p / "train" / "good").is_dir()]
    for other in others:
        for image in sorted((other / "train" / "good").glob("*.png")):
            (folder / f"{other.name}_{image.name}").symlink_to(image.resolve())
    if not any(folder.iterdir()):
        msg = f"No other category under {root} to take anomaly textures from; set dtd_dir to an image folder."
        raise FileNotFoundError(msg)
    return folder


def _build_model(spec: RunSpec) -> Any:
    """Instantiate the model with the shared evaluator and no visualizer."""
    model_class = _import(spec.class_path)
    init_args = dict(spec.init_args)
    if init_args.get("dtd_dir") == "auto":
        init_args["dtd_dir"] = _local_anomaly_source(spec.root, spec.category, spec.work_dir / "anomaly_source")
    if "image_size" in init_args:
        init_args["image_size"] = _image_size(init_args["image_size"])
    elif "pre_processor" not in init_args:
        init_args["pre_processor"] = model_class.configure_pre_processor(image_size=spec.image_size)
    return model_class(**init_args, evaluator=_evaluator(), visualizer=False)


def _cpu_seconds() -> float:
    """User and system CPU seconds of this process and its finished children (data loaders)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_one(spec: RunSpec) -> RunResult:
    """Train and test one model on one category (meant for a fresh process).

    Args:
        spec (RunSpec): What to run.

    Returns:
        RunResult: Metrics, timings, memory and the per-image test outputs.

    """
    import lightning
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    baseline_rss = _rss_mb()
    cpu_start = _cpu_seconds()
    lightning.seed_everything(spec.seed, workers=True, verbose=False)
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    model = _build_model(spec)
    datamodule = MVTecAD(
        root=spec.root,
        category=spec.category,
        train_batch_size=spec.train_batch_size,
        eval_batch_size=spec.eval_batch_size,
        num_workers=spec.num_workers,
        val_split_mode=spec.val_split_mode,
        seed=spec.seed,
    )
    recorder = _Recorder(f"{spec.name} on {spec.category}")
    engine_args: dict[str, Any] = {"max_epochs": spec.max_epochs} if spec.max_epochs else {}
    engine = Engine(
        default_root_dir=spec.work_dir,
        accelerator=spec.accelerator,
        devices=1,
        callbacks=[recorder],
        enable_progress_bar=False,
        **engine_args,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start - recorder.val_seconds
    # SMAI counts iterations (one generator and one discriminator update each) in global_step.
    trainer = engine.trainer
    budget = f"{trainer.global_step} iterations" if hasattr(model, "max_steps") else f"{trainer.current_epoch} epoch(s)"
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    cpu_seconds = _cpu_seconds() - cpu_start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    image_paths: list[str] = []
    gt_labels, gt_masks, pred_scores, pred_labels, maps = [], [], [], [], []
    for batch in recorder.outputs:
        image_paths += [str(p) for p in batch.image_path]
        gt_labels.append(batch.gt_label.int().cpu())
        pred_scores.append(batch.pred_score.float().cpu().reshape(-1))
        pred_labels.append(batch.pred_label.int().cpu().reshape(-1))
        anomaly_map = batch.anomaly_map.float().cpu()
        maps.append(anomaly_map.reshape(anomaly_map.shape[0], *anomaly_map.shape[-2:]).half())
        # The masks the metrics saw (anomalib's batch.mask_path is None when a batch starts with a good image).
        gt_mask = batch.gt_mask if batch.gt_mask is not None else torch.zeros_like(maps[-1])
        gt_masks.append(gt_mask.cpu().reshape(maps[-1].shape[0], *gt_mask.shape[-2:]).bool())
    gt = torch.cat(gt_labels).numpy()
    labels = torch.cat(pred_labels).numpy()
    good_acc, defect_acc, mean_acc = table1_accuracy(gt, labels)
    row = {
        "category": spec.category,
        "model": spec.name,
        "image_auroc": float(metrics["image_AUROC"]),
        "pixel_auroc": float(metrics["pixel_AUROC"]),
        "pro": float(metrics["pixel_AUPRO"]),
        "good_acc": good_acc,
        "defect_acc": defect_acc,
        "mean_acc": mean_acc,
        "train_time_s": train_seconds,
        "infer_ms_per_image": 1000 * recorder.test_seconds / len(gt),
        "cpu_time_s": cpu_seconds,
        "peak_rss_mb": peak_rss,
        "baseline_rss_mb": baseline_rss,
        "budget": budget,
        "image_size": "x".join(str(s) for s in maps[0].shape[-2:]),
        "n_test": len(gt),
        "status": "ok",
    }
    return RunResult(
        row=row,
        image_paths=image_paths,
        gt_labels=gt,
        gt_masks=torch.cat(gt_masks).numpy(),
        pred_scores=torch.cat(pred_scores).numpy(),
        pred_labels=labels,
        anomaly_maps=torch.cat(maps).numpy(),
    )


def table1_accuracy(gt_labels: np.ndarray, pred_labels: np.ndarray) -> tuple[float, float, float]:
    """Compute the paper's Table 1 figures: accuracy on good images, on defective ones, their mean.

    Args:
        gt_labels (np.ndarray): Ground truth, ``1`` = defective.
        pred_labels (np.ndarray): The model's thresholded labels, ``1`` = defective.

    Returns:
        tuple[float, float, float]: Good accuracy, defective accuracy, mean accuracy (``nan``
        for a class with no images).

    Example:
        >>> table1_accuracy(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
        (0.5, 1.0, 0.75)

    """
    gt = np.asarray(gt_labels).astype(bool)
    pred = np.asarray(pred_labels).astype(bool)
    good = float((~pred[~gt]).mean()) if (~gt).any() else math.nan
    defect = float(pred[gt].mean()) if gt.any() else math.nan
    return good, defect, (good + defect) / 2


class RunFailedError(RuntimeError):
    """A run failed in its worker process; the message starts with the original exception's type."""


def _worker(spec: RunSpec, sender: Any) -> None:
    """Worker process body: send back ``("ok", result)`` or ``("error", (message, traceback))``."""
    try:
        result = run_one(spec)
    except Exception as error:
        sender.send(("error", (f"{type(error).__name__}: {error}", traceback.format_exc())))
    else:
        sender.send(("ok", result))
    finally:
        sender.close()


def _run_isolated(spec: RunSpec) -> RunResult:
    """Run ``run_one`` in a fresh spawned process (its own memory peak, no shared state).

    The worker is terminated if this process is interrupted (Ctrl-C, SIGTERM) while waiting.

    Raises:
        RunFailedError: If the run raised, or the worker died (e.g. killed for lack of memory).

    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker, args=(spec, sender), name=f"benchmark-{spec.name}-{spec.category}")
    process.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        process.join()
        msg = f"The worker process died (exit code {process.exitcode}), e.g. killed for lack of memory."
        raise RunFailedError(msg) from None
    except BaseException:
        process.terminate()
        raise
    finally:
        process.join()
        receiver.close()
    if status == "error":
        message, details = payload
        logger.error("Worker traceback:\n%s", details)
        raise RunFailedError(message)
    return payload


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _format(value: Any, key: str) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if key in {"train_time_s", "infer_ms_per_image", "cpu_time_s", "peak_rss_mb", "baseline_rss_mb"}:
            return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)


def write_tables(rows: list[dict[str, Any]], output: Path, notes: Sequence[str] = ()) -> None:
    """Write ``results.csv`` (full precision) and ``results.md`` (a Markdown table and notes).

    Args:
        rows (list[dict[str, Any]]): One row per model and category, keys as in ``COLUMNS``.
        output (Path): Output folder.
        notes (Sequence[str]): Lines printed under the Markdown table.

    """
    output.mkdir(parents=True, exist_ok=True)
    with (output / "results.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS[:-1]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(_format(row[key], key) for key in COLUMNS[:-1]) + " |" for row in rows]
    failed = [f"- {row['model']} on {row['category']}: {row['status']}" for row in rows if row["status"] != "ok"]
    text = "\n".join([*lines, "", *notes, *(["", "Failed runs:", *failed] if failed else [])]) + "\n"
    (output / "results.md").write_text(text)


def plot_roc(results: dict[str, RunResult], category: str, path: Path) -> None:
    """Image-level ROC curves of all models on one category, in one PNG.

    Args:
        results (dict[str, RunResult]): Successful runs by model name.
        category (str): Category name (plot title).
        path (Path): PNG file to write.

    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.functional.classification import binary_roc

    figure, axis = plt.subplots(figsize=(5, 5))
    for name, result in results.items():
        fpr, tpr, _ = binary_roc(torch.from_numpy(result.pred_scores), torch.from_numpy(result.gt_labels).long())
        axis.plot(fpr.numpy(), tpr.numpy(), label=f"{name} (AUROC {result.row['image_auroc']:.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set(xlabel="False positive rate", ylabel="True positive rate", title=f"Image-level ROC, {category}")
    axis.set(xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _montage_indices(result: RunResult, rows: int) -> list[int]:
    """Test images to show: defect types in turn (round-robin), then one good image."""
    by_type: dict[str, list[int]] = {}
    for index in np.argsort(result.image_paths):
        by_type.setdefault(Path(result.image_paths[index]).parent.name, []).append(int(index))
    good = by_type.pop("good", [])
    chosen: list[int] = []
    queues = list(by_type.values())
    while len(chosen) < rows - bool(good) and any(queues):
        for queue in queues:
            if queue and len(chosen) < rows - bool(good):
                chosen.append(queue.pop(0))
    return chosen + good[: rows - len(chosen)]


def _load_image(path: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB").resize(size[::-1], Image.BICUBIC))


def _resize(array: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    tensor = torch.from_numpy(array.astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=size, mode=mode)[0, 0].numpy()


def plot_montage(results: dict[str, RunResult], best_peer: str | None, category: str, path: Path, rows: int) -> None:
    """Rows of test images: image, ground truth, SMAI's and the best peer's anomaly maps.

    Anomaly maps are the post-processed ones (``0`` to ``1``, ``0.5`` = the model's threshold),
    shown on the same colour scale, resized to the image for display.

    Args:
        results (dict[str, RunResult]): Successful runs by model name.
        best_peer (str | None): Name of the peer to show next to SMAI.
        category (str): Category name (title).
        path (Path): PNG file to write.
        rows (int): Most test images to show.

    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [name for name in (SMAI, best_peer) if name in results]
    reference = results[max(shown, key=lambda name: results[name].gt_masks.shape[-1])]  # sharpest masks
    indices = _montage_indices(reference, rows)
    size = (256, 256)
    columns = 2 + len(shown)
    figure, axes = plt.subplots(len(indices), columns, figsize=(2.2 * columns, 2.2 * len(indices)), squeeze=False)
    mask_style = {"cmap": "gray", "vmin": 0, "vmax": 1}
    map_style = {"cmap": "jet", "vmin": 0, "vmax": 1}
    for row, index in enumerate(indices):
        image_path = reference.image_paths[index]
        panels = [
            (_load_image(image_path, size), f"{Path(image_path).parent.name}/{Path(image_path).stem}", {}),
            (_resize(reference.gt_masks[index], size, "nearest"), "ground truth", mask_style),
        ]
        for name in shown:
            result = results[name]
            match = result.image_paths.index(image_path)
            anomaly_map = _resize(result.anomaly_maps[match], size, "bilinear")
            panels.append((anomaly_map, f"{name} score {result.pred_scores[match]:.2f}", map_style))
        for axis, (picture, title, style) in zip(axes[row], panels, strict=True):
            axis.imshow(picture, **style)
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    figure.suptitle(f"{category}: anomaly maps (0.5 = threshold)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


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
                write_tables(rows, output, _notes(config, time.perf_counter() - started))
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
        image_size=_image_size(config["image_size"]),
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
        result = _run_isolated(spec)
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


def _notes(config: dict[str, Any], seconds: float) -> list[str]:
    """Lines under the Markdown table: budgets, definitions, settings."""
    smai_args = config["model_configs"][SMAI]["init_args"] if SMAI in config["model_configs"] else {}
    return [
        f"Budgets: SMAI {smai_args.get('max_steps') or 'the trainer default of'} iterations (and its "
        "calibration, part of training); other models "
        f"{config['peer_epochs']} epoch(s) (PatchCore and PaDiM always fit in one pass).",
        f"Data: MVTecAD(root={config['root']}), val_split_mode={config['val_split_mode']} (thresholds and "
        f"normalisation fitted on that split), seed {config['seed']}, batch sizes "
        f"{config['train_batch_size']}/{config['eval_batch_size']}; peers at {config['image_size']} px, "
        "SMAI at its own image_size (metrics at each model's input size).",
        "image_auroc, pixel_auroc, pro (AUPRO up to 30% FPR): anomalib metrics from Engine.test. good_acc / "
        "defect_acc: share of good / defective test images whose post-processed pred_label is right; "
        "mean_acc: their mean (the paper's Table 1).",
        "train_time_s: wall time of Engine.fit minus its validation batches (includes coreset / Gaussian "
        "fitting, SMAI's calibration). infer_ms_per_image: test batches' wall time (pre-processing and forward "
        "pass) per image. "
        "cpu_time_s: CPU seconds (user + system) of the whole fit and test, unaffected by other load.",
        "peak_rss_mb: peak resident memory (resource.getrusage ru_maxrss) of the fresh process that trained "
        "and tested the model; baseline_rss_mb: its RSS (psutil) after imports, before building the model. "
        "glibc may keep freed memory: "
        "PatchCore's greedy coreset loop can add GBs from run to run (MALLOC_MMAP_THRESHOLD_=131072 avoids it).",
        f"Wall time so far: {seconds / 60:.1f} min; torch threads {torch.get_num_threads()}; "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}.",
    ]


if __name__ == "__main__":
    # Run the imported module's main, so the worker processes unpickle the same classes.
    from smai_plugin.benchmark import main as _main

    sys.exit(_main())
