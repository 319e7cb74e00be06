"""SMAI through anomalib's Engine on real (shrunk) images: fit, test with metrics, predict."""

import math
from pathlib import Path

import pytest
import torch
from anomalib.data import Folder, MVTecAD
from anomalib.engine import Engine

from smai_plugin import Smai

from .conftest import TINY_MODEL_ARGS

pytestmark = pytest.mark.slow


def tiny_mvtec(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="hazelnut_toy", train_batch_size=4, eval_batch_size=5, num_workers=0, seed=0)


PAPER_SCORING = {"scoring": "leave_one_out", "score_measure": "ssim", "comparison": "per_pass", "calibration": "none"}


@pytest.mark.parametrize("scoring", [{}, PAPER_SCORING, {"score_measure": "l2", "comparison": "per_pass"}])
def test_fit_test_predict(tiny_root: Path, tmp_path: Path, scoring: dict) -> None:
    torch.manual_seed(0)
    model = Smai(**TINY_MODEL_ARGS, **scoring)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1)
    datamodule = tiny_mvtec(tiny_root)
    engine.fit(model=model, datamodule=datamodule)
    # Budget: max_steps iterations, each one generator and one discriminator update.
    assert engine.trainer.global_step == TINY_MODEL_ARGS["max_steps"]
    # Validation ran once at the end and fitted the post-processor's statistics.
    assert math.isfinite(float(model.post_processor.image_max))
    assert math.isfinite(float(model.post_processor._image_threshold))

    metrics = engine.test(model=model, datamodule=datamodule)[0]
    # anomalib's default metrics, as for the built-in models (``anomalib benchmark`` tables need the same set).
    assert set(metrics) == {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"}
    for name, value in metrics.items():
        assert 0.0 <= value <= 1.0, name

    predictions = engine.predict(model=model, datamodule=datamodule)
    batch = predictions[0]
    assert batch.anomaly_map.shape[-2:] == (64, 64)
    assert batch.pred_score.shape == (5,)
    assert torch.all((batch.pred_score >= 0) & (batch.pred_score <= 1))  # normalised by the post-processor
    assert batch.pred_mask is not None
    # Visualizer wrote pictures of the anomaly maps.
    assert list(Path(tmp_path).rglob("*.png"))


def test_folder_datamodule(tiny_root: Path, tmp_path: Path) -> None:
    category = tiny_root / "hazelnut_toy"
    defect = next(d.name for d in (category / "test").iterdir() if d.name != "good")
    datamodule = Folder(
        name="hazelnut_folder",
        root=category,
        normal_dir="train/good",
        abnormal_dir=f"test/{defect}",
        normal_test_dir="test/good",
        mask_dir=f"ground_truth/{defect}",
        train_batch_size=4,
        eval_batch_size=5,
        num_workers=0,
        seed=0,
    )
    model = Smai(**{**TINY_MODEL_ARGS, "max_steps": 1})
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1)
    engine.fit(model=model, datamodule=datamodule)
    metrics = engine.test(model=model, datamodule=datamodule)[0]
    assert 0.0 <= metrics["pixel_AUROC"] <= 1.0
    assert 0.0 <= metrics["image_AUROC"] <= 1.0


def test_normalising_pre_processor_is_refused(tiny_root: Path, tmp_path: Path) -> None:
    from anomalib.models.components import AnomalibModule

    model = Smai(**TINY_MODEL_ARGS, pre_processor=AnomalibModule.configure_pre_processor((64, 64)))
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1)
    with pytest.raises(ValueError, match="must not normalise"):
        engine.fit(model=model, datamodule=tiny_mvtec(tiny_root))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_masked": 0}, "n_masked"),
        ({"n_masked": 80, "n_superpixels": 77}, "n_masked"),
        ({"max_steps": 0}, "max_steps"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"scoring": "sideways"}, "scoring"),
        ({"score_measure": "l1"}, "score_measure"),
        ({"score_measure": ["msgms", "l2"], "calibration": "none"}, "pick one measure"),
        ({"comparison": "sideways"}, "comparison"),
        ({"calibration": "maybe"}, "calibration"),
        ({"top_k_fraction": 1.5}, "top_k_fraction"),
        ({"base_channels": -8}, "base_channels"),
        ({"n_superpixels": 2.5}, "n_superpixels must be a whole number"),
        ({"max_steps": 2.5}, "max_steps must be a whole number"),
        ({"slic_iterations": 0}, "slic_iterations"),
        ({"discriminator_channels": 0}, "discriminator_channels"),
        ({"image_size": 100}, "image_size"),
    ],
)
def test_invalid_config_values_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Smai(**kwargs)


def test_an_int_image_size_is_a_square() -> None:
    assert tuple(Smai(image_size=128).input_size) == (128, 128)
