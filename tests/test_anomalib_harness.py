"""SMAI inside anomalib's own harnesses: its model test flow, ``anomalib benchmark``, ``anomalib predict``."""

import csv
from pathlib import Path

import pytest
import yaml
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.models import get_model

from .conftest import TINY_MODEL_ARGS, make_tiny_mvtec
from .test_cli import ANOMALIB, run

pytestmark = pytest.mark.slow


def test_default_smai_through_anomalib_model_test_flow(tmp_path: Path) -> None:
    """What anomalib's tests/integration/model/test_models.py does for every built-in model.

    ``get_model`` with default arguments (256x256, 77 superpixels, PEN-Net width 32), bounded by
    ``Engine(max_epochs=1)``: fit, then test, train, validate, predict and export (Torch, ONNX,
    OpenVINO) from the checkpoint anomalib saved.
    """
    root = make_tiny_mvtec(tmp_path / "data", n_train=4)
    model = get_model("smai")
    datamodule = MVTecAD(root=root, category="hazelnut_toy", train_batch_size=2)
    project = tmp_path / "project"
    engine = Engine(logger=False, default_root_dir=project, max_epochs=1, devices=1, max_steps=-1)
    engine.fit(model=model, datamodule=datamodule)
    assert engine.trainer.global_step == 2  # one epoch: 4 images in batches of 2
    checkpoint = project / model.name / datamodule.name / "hazelnut_toy" / "v0" / "weights" / "lightning" / "model.ckpt"
    assert checkpoint.is_file()
    results = engine.test(model=model, datamodule=datamodule, ckpt_path=checkpoint)[0]
    assert 0 <= results["image_AUROC"] <= 1
    engine.train(model=model, datamodule=datamodule, ckpt_path=checkpoint)
    engine.validate(model=model, datamodule=datamodule, ckpt_path=checkpoint)
    predictions = engine.predict(model=model, datamodule=datamodule, ckpt_path=checkpoint)
    assert predictions[0].anomaly_map.shape[-2:] == (256, 256)
    for export_type in ExportType:
        path = engine.export(model=model, export_type=export_type, ckpt_path=checkpoint)
        assert path.is_file(), export_type


def offline_hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache holding timm's ``resnet18`` (PaDiM's default backbone).

    There is no internet here, so the weights are freshly initialised, not ImageNet's: PaDiM's
    metrics mean nothing, but timm, the hub client and the whole pipeline run for real.
    """
    import safetensors.torch
    import timm

    repo, revision = root / "models--timm--resnet18.a1_in1k", "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    safetensors.torch.save_file(timm.create_model("resnet18").state_dict(), str(snapshot / "model.safetensors"))
    return root


def test_anomalib_benchmark_runs_smai_beside_a_built_in_model(tmp_path: Path) -> None:
    """``anomalib benchmark`` tabulates a grid only if every job has the same config keys and metrics.

    So both models come with their defaults (the README's YAML), the trainer budget comes from
    Lightning's ``PL_TRAINER_MAX_EPOCHS``, and SMAI's default evaluator is anomalib's.
    """
    root = make_tiny_mvtec(tmp_path / "data")
    config = {
        "accelerator": ["cpu"],
        "benchmark": {
            "seed": 42,
            "model": {"class_path": {"grid": ["Smai", "Padim"]}},
            "data": {
                "class_path": "MVTecAD",
                "init_args": {"root": str(root), "category": "hazelnut_toy", "num_workers": 0},
            },
        },
    }
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(config))
    hub = offline_hub_cache(tmp_path / "hub")
    env = {"PL_TRAINER_MAX_EPOCHS": "1", "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    run([ANOMALIB, "benchmark", "--config", str(path)], cwd=tmp_path, env=env)
    results = list((tmp_path / "runs" / "benchmark").rglob("results.csv"))
    assert results, "anomalib benchmark wrote no results table (see runs/pipeline.log)"
    with results[0].open() as file:
        rows = {row["model.class_path"]: row for row in csv.DictReader(file)}
    assert set(rows) == {"Smai", "Padim"}
    for metric in ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"):
        assert 0 <= float(rows["Smai"][metric]) <= 1, metric


def test_anomalib_predict_writes_anomaly_map_pictures(tiny_root: Path, tmp_path: Path) -> None:
    from smai_plugin import Smai

    model = Smai(**TINY_MODEL_ARGS)
    engine = Engine(default_root_dir=tmp_path / "fit", accelerator="cpu", devices=1, logger=False)
    engine.fit(
        model=model, datamodule=MVTecAD(root=tiny_root, category="hazelnut_toy", train_batch_size=4, num_workers=0)
    )
    checkpoint = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    images = tiny_root / "hazelnut_toy" / "test"
    single = next(images.rglob("*.png"))

    # Python: a single image and a folder, as for built-in models.
    for data_path, count in ((single, 1), (images, len(list(images.rglob("*.png"))))):
        predictions = engine.predict(model=model, data_path=data_path)
        assert sum(len(batch.pred_score) for batch in predictions) == count

    # Command line: pictures of the anomaly maps, one per image.
    output = tmp_path / "predicted"
    args = [ANOMALIB, "predict", "--model", "Smai", "--ckpt_path", str(checkpoint), "--data", str(images)]
    for key, value in TINY_MODEL_ARGS.items():
        args += [f"--model.{key}", str(list(value) if isinstance(value, tuple) else value)]
    run([*args, "--default_root_dir", str(output)], cwd=tmp_path)
    pictures = list(output.rglob("*.png"))
    assert len(pictures) == len(list(images.rglob("*.png")))
