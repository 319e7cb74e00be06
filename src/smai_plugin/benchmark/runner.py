"""One model on one category: train with ``Engine.fit``, test with ``Engine.test``, in a fresh process.

:func:`run_isolated` starts a spawned worker per run, so each run's peak memory is its own and no
state leaks from one model to the next; the worker unpickles :class:`RunSpec` and sends back a
:class:`RunResult` by their module path (``smai_plugin.benchmark.runner``).

Example:
    >>> table1_accuracy(np.array([0, 1]), np.array([0, 0]))
    (1.0, 0.0, 0.5)

"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing
import resource
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from .config import as_image_size
from .memory import PeakMemory, rss_mib

__all__ = ["RunFailedError", "RunResult", "RunSpec", "evaluator", "run_isolated", "run_one", "table1_accuracy"]

logger = logging.getLogger(__package__)


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
    reconstructions: np.ndarray | None = None  # SMAI's, 8-bit (N, H, W, 3); None for the peers


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


def evaluator() -> Any:
    """Build the metrics every model is tested with: image AUROC, pixel AUROC, PRO (AUPRO, 30% FPR).

    Returns:
        Any: An anomalib ``Evaluator`` with these test metrics.

    """
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
        init_args["image_size"] = as_image_size(init_args["image_size"])
    elif "pre_processor" not in init_args:
        init_args["pre_processor"] = model_class.configure_pre_processor(image_size=spec.image_size)
    return model_class(**init_args, evaluator=evaluator(), visualizer=False)


def _cpu_seconds() -> float:
    """User and system CPU seconds of this process and its finished children (data loaders)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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
    baseline_rss = rss_mib()
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
    with PeakMemory() as memory:
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        train_seconds = time.perf_counter() - start - recorder.val_seconds
        # SMAI counts iterations (one generator and one discriminator update each) in global_step.
        trainer = engine.trainer
        epochs = f"{trainer.current_epoch} epoch(s)"
        budget = f"{trainer.global_step} iterations" if hasattr(model, "max_steps") else epochs
        metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    cpu_seconds = _cpu_seconds() - cpu_start

    image_paths: list[str] = []
    gt_labels, gt_masks, pred_scores, pred_labels, maps, reconstructions = [], [], [], [], [], []
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
        reconstruction = getattr(batch, "reconstruction", None)
        if reconstruction is not None:
            reconstructions.append((reconstruction.float().cpu().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1))
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
        "peak_rss_mb": memory.peak_rss_mib,
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
        reconstructions=torch.cat(reconstructions).numpy() if reconstructions else None,
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


def run_isolated(spec: RunSpec) -> RunResult:
    """Run :func:`run_one` in a fresh spawned process (its own memory peak, no shared state).

    The worker is terminated if this process is interrupted (Ctrl-C, SIGTERM) while waiting.

    Args:
        spec (RunSpec): What to run.

    Returns:
        RunResult: The worker's result.

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
