"""The benchmark's configuration: built-in defaults, a YAML file, command-line overrides, checks.

Example:
    >>> config = load_config(overrides={"categories": "grid"})
    >>> config["root"], config["categories"], config["models"]
    ('./datasets/MVTecAD', ['grid'], ['smai', 'patchcore', 'padim'])

"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from smai_plugin.backbone import OFFLINE_BACKBONE

__all__ = ["DEFAULT_CONFIG", "DEFAULT_ROOT", "SMAI", "as_image_size", "check_category", "load_config"]

SMAI = "smai"  # the name of SMAI's entry in the config's ``model_configs``

# anomalib's own default root of MVTecAD, and the configs' ``data.init_args.root``.
DEFAULT_ROOT = "./datasets/MVTecAD"

# Defaults when no --config is given: the paper's SMAI (50,000 steps, 256 px) and anomalib's
# PatchCore coreset (10%), i.e. GPU-sized; configs/benchmark_cpu.yaml is the CPU preset.
DEFAULT_CONFIG: dict[str, Any] = {
    "root": DEFAULT_ROOT,
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
    as_image_size(config["image_size"])
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


def as_image_size(value: int | Sequence[int]) -> tuple[int, int]:
    """Read ``256`` or ``[256, 256]`` as a ``(height, width)`` tuple of positive integers.

    Args:
        value (int | Sequence[int]): One side, or height and width.

    Returns:
        tuple[int, int]: Height and width.

    Raises:
        ValueError: If ``value`` is not one or two positive integers.

    Example:
        >>> as_image_size(256), as_image_size([128, 192])
        ((256, 256), (128, 192))

    """
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
