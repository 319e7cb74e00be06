"""The benchmark: offline backbone, configuration, Table 1 accuracy, and one end-to-end run."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from smai_plugin.benchmark import COLUMNS, OFFLINE_BACKBONE, check_category, load_config, main, table1_accuracy

from .conftest import TINY_MODEL_ARGS

REPO = Path(__file__).resolve().parents[1]


def test_offline_backbone_has_imagenet_weights() -> None:
    from skimage import data

    net = timm.create_model(OFFLINE_BACKBONE, pretrained=True).eval()
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        top = net((image - mean[:, None, None]) / std[:, None, None]).argmax().item()
    assert 281 <= top <= 285  # ImageNet's cat classes: the weights are the trained ones


def test_offline_backbone_features_for_anomalib() -> None:
    from anomalib.models.components import TimmFeatureExtractor

    extractor = TimmFeatureExtractor(OFFLINE_BACKBONE, layers=["blocks.2", "blocks.4"], pre_trained=True)
    features = extractor(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features.values()] == [(1, 40, 8, 8), (1, 112, 4, 4)]
    untrained = timm.create_model(OFFLINE_BACKBONE, pretrained=False, features_only=True)
    assert not torch.equal(extractor.feature_extractor.conv_stem.weight, untrained.conv_stem.weight)


def test_table1_accuracy() -> None:
    good, defect, mean = table1_accuracy(np.array([0, 0, 0, 0, 1, 1]), np.array([0, 0, 0, 1, 1, 0]))
    assert (good, defect, mean) == (0.75, 0.5, 0.625)
    assert math.isnan(table1_accuracy(np.array([1, 1]), np.array([1, 0]))[0])


def test_cpu_preset_takes_smai_preset_and_overrides() -> None:
    config = load_config(
        REPO / "configs" / "benchmark_cpu.yaml", {"model_configs": {"smai": {"init_args": {"max_steps": 7}}}}
    )
    smai_preset = yaml.safe_load((REPO / "configs" / "smai_cpu.yaml").read_text())["model"]["init_args"]
    smai = config["model_configs"]["smai"]["init_args"]
    del smai_preset["evaluator"]  # every model is tested with the benchmark's evaluator
    assert smai == {**smai_preset, "max_steps": 7}
    assert config["model_configs"]["patchcore"]["init_args"]["coreset_sampling_ratio"] == 0.01


def test_cpu_benchmark_trains_smai_with_its_preset_batch() -> None:
    """The harness has one training batch size for all models: the CPU one must be the SMAI preset's.

    SMAI's iterations count batches, so another batch size would train another model than the
    preset (and take another time); PatchCore and PaDiM do not depend on it.
    """
    preset_data = yaml.safe_load((REPO / "configs" / "smai_cpu.yaml").read_text())["data"]["init_args"]
    config = load_config(REPO / "configs" / "benchmark_cpu.yaml")
    assert config["train_batch_size"] == preset_data["train_batch_size"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"colour": 1}, "Unknown benchmark config keys"),
        ({"models": ["fastflow"]}, "Unknown or no models"),
        ({"image_size": 0}, "image_size"),
        ({"peer_epochs": 0}, "peer_epochs"),
    ],
)
def test_bad_config_is_refused(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config(overrides=overrides)


def test_missing_category_is_reported(tiny_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Category 'carpet' not found.*hazelnut_toy"):
        check_category(tiny_root, "carpet")


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()


@pytest.mark.slow
def test_benchmark_end_to_end(tiny_root: Path, tmp_path: Path) -> None:
    config = {
        "root": str(tiny_root),
        "categories": ["hazelnut_toy"],
        "image_size": 64,
        "train_batch_size": 4,
        "eval_batch_size": 5,
        "accelerator": "cpu",
        "model_configs": {"smai": {"init_args": {**TINY_MODEL_ARGS, "image_size": [64, 64]}}},
    }
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    output = tmp_path / "out"

    code = main(["--config", str(config_path), "--output", str(output), "--models", "smai", "padim"])
    assert code == 0

    with (output / "results.csv").open() as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert [row["model"] for row in rows] == ["smai", "padim"]
    for row in rows:
        assert row["status"] == "ok"
        assert row["n_test"] == "5"
        assert row["image_size"] == "64x64"
        for key in ("image_auroc", "pixel_auroc", "pro", "good_acc", "defect_acc", "mean_acc"):
            assert 0.0 <= float(row[key]) <= 1.0, key
        for key in ("train_time_s", "infer_ms_per_image", "cpu_time_s", "baseline_rss_mb"):
            assert float(row[key]) > 0, key
        assert float(row["peak_rss_mb"]) >= float(row["baseline_rss_mb"])
    assert rows[0]["budget"] == f"{TINY_MODEL_ARGS['max_steps']} iterations"
    assert "| category | model | image_auroc |" in (output / "results.md").read_text()
    assert_png(output / "roc_hazelnut_toy.png")
    assert_png(output / "montage_hazelnut_toy.png")
    with Image.open(output / "montage_hazelnut_toy.png") as montage:
        # image | SMAI's reconstruction | ground truth | SMAI's map | PaDiM's map, 2.2 inches at 100 dpi each
        assert montage.width == 5 * 220
