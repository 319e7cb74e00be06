"""The ways an anomalib user selects SMAI: short name, class path, YAML, get_model, in fresh processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, TINY_MODEL_ARGS

pytestmark = pytest.mark.slow

ANOMALIB = str(Path(sys.executable).parent / "anomalib")


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def tiny_cli_args(tiny_root: Path) -> list[str]:
    args = [
        "--data",
        "MVTecAD",
        "--data.root",
        str(tiny_root),
        "--data.category",
        "hazelnut_toy",
        "--data.train_batch_size",
        "4",
        "--data.eval_batch_size",
        "5",
        "--data.num_workers",
        "0",
        "--trainer.accelerator",
        "cpu",
    ]
    for key, value in TINY_MODEL_ARGS.items():
        args += [f"--model.{key}", str(list(value) if isinstance(value, tuple) else value)]
    return args


ANOMALIB_METRICS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score")  # every model's default


def assert_metrics_printed(output: str, metrics: tuple[str, ...] = ANOMALIB_METRICS) -> None:
    for metric in metrics:
        assert metric in output, output[-4000:]


def test_get_model_by_name_without_import(tmp_path: Path) -> None:
    code = (
        "import sys, anomalib.models as m\n"
        "assert 'smai_plugin' not in sys.argv\n"
        "model = m.get_model('smai', n_superpixels=20, n_masked=3, base_channels=8)\n"
        "print(type(model).__module__, type(model).__name__, model.model.masker.n_superpixels)\n"
        "print(type(m.get_model({'class_path': 'Smai'})).__name__)\n"
        "print(type(m.get_model({'class_path': 'smai_plugin.Smai'})).__name__)\n"
    )
    output = run([sys.executable, "-c", code], cwd=tmp_path)
    assert "smai_plugin.lightning_model Smai 20" in output
    assert output.count("Smai") >= 3


@pytest.mark.parametrize("model_name", ["Smai", "smai_plugin.Smai"])
def test_anomalib_train_by_name(tiny_root: Path, tmp_path: Path, model_name: str) -> None:
    output = run(
        [
            ANOMALIB,
            "train",
            "--model",
            model_name,
            *tiny_cli_args(tiny_root),
            "--default_root_dir",
            str(tmp_path / "results"),
        ],
        cwd=tmp_path,
    )
    assert_metrics_printed(output)
    assert list((tmp_path / "results").rglob("*.ckpt"))


@pytest.mark.parametrize("model_entry", ["class_path", "short"])
def test_anomalib_train_from_yaml(tiny_root: Path, tmp_path: Path, model_entry: str) -> None:
    init_args = {key: list(value) if isinstance(value, tuple) else value for key, value in TINY_MODEL_ARGS.items()}
    model = {"class_path": "smai_plugin.Smai", "init_args": init_args} if model_entry == "class_path" else "Smai"
    config = {
        "model": model,
        "data": {
            "class_path": "anomalib.data.MVTecAD",
            "init_args": {
                "root": str(tiny_root),
                "category": "hazelnut_toy",
                "train_batch_size": 4,
                "eval_batch_size": 5,
                "num_workers": 0,
            },
        },
        "trainer": {"accelerator": "cpu"},
    }
    config_path = tmp_path / "smai.yaml"
    config_path.write_text(yaml.safe_dump(config))
    extra = (
        []
        if model_entry == "class_path"
        else [
            arg
            for key, value in TINY_MODEL_ARGS.items()
            for arg in (f"--model.{key}", str(list(value) if isinstance(value, tuple) else value))
        ]
    )
    output = run(
        [ANOMALIB, "train", "--config", str(config_path), *extra, "--default_root_dir", str(tmp_path / "results")],
        cwd=tmp_path,
    )
    assert_metrics_printed(output)


def test_every_config_parses_and_the_cpu_config_runs(tiny_root: Path, tmp_path: Path) -> None:
    """All configs build through anomalib's CLI parser; the CPU config trains and tests for real."""
    from anomalib.cli import AnomalibCLI

    from smai_plugin import Smai

    # Model configs (anomalib CLI); configs/benchmark_*.yaml drive smai-benchmark (tests/test_benchmark.py).
    configs = [c for c in sorted((REPO / "configs").glob("*.yaml")) if "model" in yaml.safe_load(c.read_text())]
    assert len(configs) >= 2
    for config in configs:
        cli = AnomalibCLI(
            ["train", "--config", str(config), "--data.root", str(tiny_root), "--data.category", "hazelnut_toy"],
            run=False,
        )
        assert isinstance(cli.model, Smai)
        declared = yaml.safe_load(config.read_text())["model"]["init_args"]
        assert cli.model.max_steps == declared["max_steps"]
        assert cli.model.model.masker.n_superpixels == declared["n_superpixels"]
        assert tuple(cli.model.input_size) == tuple(declared["image_size"])
    output = run(
        [
            ANOMALIB,
            "train",
            "--config",
            str(REPO / "configs" / "smai_cpu.yaml"),
            "--data.root",
            str(tiny_root),
            "--data.category",
            "hazelnut_toy",
            "--data.num_workers",
            "0",
            "--model.max_steps",
            "2",
            "--model.image_size",
            "[64, 64]",
            "--default_root_dir",
            str(tmp_path / "results"),
        ],
        cwd=tmp_path,
    )
    assert_metrics_printed(output, (*ANOMALIB_METRICS, "pixel_AUPRO"))  # the configs add PRO
