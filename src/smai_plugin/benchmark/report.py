"""The benchmark's outputs: ``results.csv``, ``results.md`` with its notes, ROC curves, anomaly-map montage.

matplotlib (the ``benchmark`` extra) is imported only when a plot is drawn.

Example:
    >>> print(markdown_table(["model", "image_auroc"], [["smai", "0.972"], ["padim", "0.999"]]))
    | model | image_auroc |
    |---|---|
    | smai | 0.972 |
    | padim | 0.999 |

"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import SMAI
from .runner import RunResult

__all__ = ["COLUMNS", "format_cell", "markdown_table", "plot_montage", "plot_roc", "table_notes", "write_tables"]

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


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Format a Markdown table: a header of ``columns``, its rule, a line per row.

    Args:
        columns (Sequence[str]): Column names.
        rows (Iterable[Sequence[Any]]): Cells of each row, already formatted (others go through ``str``).

    Returns:
        str: The table's lines, without a final newline.

    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_cell(value: Any, key: str = "") -> str:
    """Format a table cell: ``n/a`` for NaN, whole numbers for the harness's times and memory, else 3 decimals.

    Example:
        >>> format_cell(float("nan")), format_cell(0.97213), format_cell(123.4, "train_time_s")
        ('n/a', '0.972', '123')

    """
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
    shown = COLUMNS[:-1]  # the status goes under the table, for failed runs
    table = markdown_table(shown, ([format_cell(row[key], key) for key in shown] for row in rows))
    failed = [f"- {row['model']} on {row['category']}: {row['status']}" for row in rows if row["status"] != "ok"]
    text = "\n".join([table, "", *notes, *(["", "Failed runs:", *failed] if failed else [])]) + "\n"
    (output / "results.md").write_text(text)


def table_notes(config: dict[str, Any], seconds: float) -> list[str]:
    """Lines under the Markdown table: budgets, definitions, settings.

    Args:
        config (dict[str, Any]): The benchmark's configuration (see :func:`load_config`).
        seconds (float): Wall time of the benchmark so far.

    Returns:
        list[str]: One paragraph per line.

    """
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
        "peak_rss_mb: peak resident memory (psutil, sampled every 10 ms) of the fresh process while it trained "
        "and tested the model; baseline_rss_mb: its RSS (psutil) after imports, before building the model. "
        "glibc may keep freed memory: "
        "PatchCore's greedy coreset loop can add GBs from run to run (MALLOC_MMAP_THRESHOLD_=131072 avoids it).",
        f"Wall time so far: {seconds / 60:.1f} min; torch threads {torch.get_num_threads()}; "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}.",
    ]


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


def _load_image(source: str | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Read an image file, or take an 8-bit ``(H, W, 3)`` array, as RGB at ``size``."""
    from PIL import Image

    image = Image.open(source).convert("RGB") if isinstance(source, str) else Image.fromarray(source)
    return np.asarray(image.resize(size[::-1], Image.BICUBIC))


def _resize(array: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    tensor = torch.from_numpy(array.astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=size, mode=mode)[0, 0].numpy()


def plot_montage(results: dict[str, RunResult], best_peer: str | None, category: str, path: Path, rows: int) -> None:
    """Rows of test images: image, SMAI's reconstruction, ground truth, SMAI's and the best peer's anomaly maps.

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
    reconstructions = results[SMAI].reconstructions if SMAI in results else None
    columns = 2 + (reconstructions is not None) + len(shown)
    figure, axes = plt.subplots(len(indices), columns, figsize=(2.2 * columns, 2.2 * len(indices)), squeeze=False)
    mask_style = {"cmap": "gray", "vmin": 0, "vmax": 1}
    map_style = {"cmap": "jet", "vmin": 0, "vmax": 1}
    for row, index in enumerate(indices):
        image_path = reference.image_paths[index]
        panels = [(_load_image(image_path, size), f"{Path(image_path).parent.name}/{Path(image_path).stem}", {})]
        if reconstructions is not None:
            reconstruction = reconstructions[results[SMAI].image_paths.index(image_path)]
            panels.append((_load_image(reconstruction, size), "SMAI reconstruction", {}))
        panels.append((_resize(reference.gt_masks[index], size, "nearest"), "ground truth", mask_style))
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
