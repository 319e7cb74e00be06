"""The ways an anomalib user selects SMAI: short name, class path, YAML, get_model, in fresh processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, TINY_MODEL_ARGS, make_tiny_mvtec

pytestmark = pytest.mark.slow

ANOMALIB = str(Path(sys.executable).parent / "anomalib")


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, returncode: int = 0) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == returncode, output[-4000:]
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


@pytest.mark.parametrize("refusal", ["setting", "data"])
def test_cli_shows_a_refusal_in_two_lines(tmp_path: Path, refusal: str) -> None:
    """A refused setting (reported by jsonargparse) or data folder (raised in fit) ends in its message, no trace."""
    root = make_tiny_mvtec(tmp_path / "data", n_train=2, n_good=1, n_defect=1)
    args = [ANOMALIB, "train", "--model", "Smai", *tiny_cli_args(root), "--default_root_dir", str(tmp_path / "out")]
    if refusal == "setting":
        args += ["--model.n_masked", "10"]  # more than the 9 superpixels
        message = "SMAI refused the input: n_masked must be between 1 and n_superpixels (9), got 10."
    else:
        for path in (root / "hazelnut_toy" / "train" / "good").iterdir():
            path.unlink()
        message = f"SMAI refused the input: The training set is empty: no images were found in {root / 'hazelnut_toy'}"
    output = run(args, cwd=tmp_path, returncode=1)
    assert "Traceback" not in output, output[-4000:]
    last_lines = output.strip().splitlines()[-2:]
    assert last_lines[0].startswith(message), output[-4000:]
    assert last_lines[1] == "(The full traceback: rerun with SMAI_TRACEBACK=1.)"
    if refusal == "setting":  # the full report stays one variable away
        full = run(args, cwd=tmp_path, env={"SMAI_TRACEBACK": "1"}, returncode=1)
        assert "Traceback" in full
        assert message.removeprefix("SMAI refused the input: ") in full
