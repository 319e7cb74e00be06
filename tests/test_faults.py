"""Faults that would cost a user work: caught before training, told in a few lines, never raised for good data."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import Padim, Patchcore
from lightning.pytorch.callbacks import Callback

from smai_plugin import Smai, SmaiInputError, SmaiModel
from smai_plugin.backbone import OFFLINE_BACKBONE

from .conftest import TINY_MODEL_ARGS, make_tiny_mvtec

CATEGORY = "hazelnut_toy"
ANOMALIB = str(Path(sys.executable).parent / "anomalib")


def datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category=CATEGORY, train_batch_size=4, eval_batch_size=4, num_workers=0, seed=0)


def engine(work: Path, **kwargs) -> Engine:
    return Engine(default_root_dir=work, accelerator="cpu", devices=1, logger=False, **kwargs)


def tiny_model(**kwargs) -> Smai:
    return Smai(**{**TINY_MODEL_ARGS, **kwargs}, visualizer=False)


class CountSteps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1


@pytest.mark.slow
def test_one_training_image_is_refused_before_the_first_step(tmp_path: Path) -> None:
    root = make_tiny_mvtec(tmp_path / "data", n_train=1, n_good=1, n_defect=1)
    counter = CountSteps()
    with pytest.raises(SmaiInputError, match=r"needs at least 2, got 1: add training images .*calibration='none'"):
        engine(tmp_path / "out", callbacks=[counter]).fit(tiny_model(), datamodule=datamodule(root))
    assert counter.steps == 0
    # Two images train, with a warning that the calibration is rough; without calibration, one image trains.
    root = make_tiny_mvtec(tmp_path / "two", n_train=2, n_good=1, n_defect=1)
    with pytest.warns(UserWarning, match=r"calibrates on only 2 normal training images"):
        engine(tmp_path / "out2").fit(tiny_model(), datamodule=datamodule(root))
    root = make_tiny_mvtec(tmp_path / "one", n_train=1, n_good=1, n_defect=1)
    single = tiny_model(score_measure="ssim", comparison="per_pass", calibration="none")
    engine(tmp_path / "out3", callbacks=[counter]).fit(single, datamodule=datamodule(root))
    assert counter.steps == TINY_MODEL_ARGS["max_steps"]


class CountTested(Callback):
    def __init__(self) -> None:
        self.images = 0

    def on_test_batch_end(self, trainer, module, outputs, batch, *args) -> None:
        self.images += len(batch.image)


@pytest.mark.slow
def test_a_validation_good_folder_is_read_as_anomalib_reads_it(tmp_path: Path) -> None:
    """MVTec 3D-AD ships validation/good: anomalib's MVTecAD leaves it out, and so does SMAI (same test images)."""
    root = make_tiny_mvtec(tmp_path / "data", n_train=6, n_good=2, n_defect=2)
    validation = root / CATEGORY / "validation" / "good"
    validation.mkdir(parents=True)
    for path in sorted((root / CATEGORY / "train" / "good").glob("*.png"))[:2]:
        shutil.copy(path, validation / f"val_{path.name}")
    smai, patchcore = CountTested(), CountTested()
    engine(tmp_path / "smai", callbacks=[smai]).train(tiny_model(), datamodule=datamodule(root))
    peer = Patchcore(backbone=OFFLINE_BACKBONE, layers=["blocks.2", "blocks.4"], coreset_sampling_ratio=0.5)
    engine(tmp_path / "patchcore", callbacks=[patchcore]).train(peer, datamodule=datamodule(root))
    # The 2 good and 2 defective test images, as anomalib's data module lists them; validation/good is not tested.
    data = datamodule(root)
    data.setup()
    assert smai.images == patchcore.images == len(data.test_data) == 4
    # A folder of defective-looking images outside test/ is still refused: anomalib would fail on it.
    stray = root / CATEGORY / "validation" / "crack" / "x.png"
    stray.parent.mkdir()
    shutil.copy(next(validation.iterdir()), stray)
    with pytest.raises(SmaiInputError, match=r"would take them for defective images without masks, and fail"):
        engine(tmp_path / "smai2").fit(tiny_model(), datamodule=datamodule(root))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny SMAI checkpoint, a PaDiM checkpoint and the data root they were fitted on."""
    work = tmp_path_factory.mktemp("checkpoints")
    root = make_tiny_mvtec(work / "data", n_train=4, n_good=1, n_defect=1)
    smai = engine(work / "smai")
    smai.fit(tiny_model(), datamodule=datamodule(root))
    padim = engine(work / "padim")
    padim.fit(Padim(backbone=OFFLINE_BACKBONE, layers=["blocks.2"], n_features=10), datamodule=datamodule(root))
    return (
        Path(smai.trainer.checkpoint_callback.best_model_path),
        Path(padim.trainer.checkpoint_callback.best_model_path),
        root,
    )


@pytest.mark.slow
@pytest.mark.parametrize("which", ["other_settings", "other_model"])
def test_a_checkpoint_that_does_not_fit_is_refused_in_a_few_lines(checkpoints, tmp_path: Path, which: str) -> None:
    smai, padim, root = checkpoints
    path = smai if which == "other_settings" else padim
    args = [ANOMALIB, "test", "--model", "Smai", "--ckpt_path", str(path), "--data", "MVTecAD"]
    args += ["--data.root", str(root), "--data.category", CATEGORY, "--data.num_workers", "0"]
    args += ["--trainer.accelerator", "cpu", "--default_root_dir", str(tmp_path)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output[-3000:]
    # anomalib's own start-up log (about 20 lines), then the refusal alone: the file, the model, the fix.
    after_start_up = output.split("Restoring states from the checkpoint path")[-1].strip().splitlines()
    assert len(after_start_up) <= 3, output[-3000:]
    assert len(output.splitlines()) <= 30, output[-3000:]  # torch listed 280-380 lines of keys here
    last = output.splitlines()[-2]
    assert last.startswith(f"SMAI refused the input: The checkpoint {path} "), output[-3000:]
    if which == "other_settings":  # names the settings and the arguments that load it
        assert "base_channels=8 (here 32)" in last
        assert "--model.base_channels 8" in last
        assert "--model.image_size '[64, 64]'" in last
    else:
        assert "does not hold a SMAI model" in last
        assert "n_features" in last  # PaDiM's settings, read from the checkpoint
    # In Python, the same checkpoint loads with its own settings.
    if which == "other_settings":
        assert Smai.load_from_checkpoint(path).model.generator is not None


def test_a_checkpoint_loaded_with_other_measures_names_them(checkpoints) -> None:
    smai, _, _ = checkpoints
    model = Smai.load_from_checkpoint(smai, score_measure="msgms").model.eval()
    with pytest.raises(SmaiInputError, match=r"fitted for 2 score measure\(s\), but the model now scores with 1"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(SmaiInputError, match=r"Unknown image_score_measure 'memroy'"):
        Smai(image_score_measure="memroy")


def test_the_torch_model_refuses_what_it_cannot_score() -> None:
    """Python calls of the torch model refuse NaN, infinite and 0-255 pixels; an exported graph does not check."""
    model = SmaiModel(n_superpixels=9, base_channels=8).eval()
    images = torch.rand(2, 3, 64, 64)
    assert torch.isfinite(model(images).pred_score).all()
    broken = images.clone()
    broken[1, 0, 3, 3] = float("nan")
    with pytest.raises(SmaiInputError, match=r"Images \[1\] of the batch hold NaN or infinite pixels"):
        model(broken)
    with pytest.raises(SmaiInputError, match=r"in \[0, 1\], got values from .* to 2.*divide 8-bit images by 255"):
        model(images * 255)


@pytest.mark.slow
def test_exporting_an_untrained_model_warns(tmp_path: Path) -> None:
    model = tiny_model(score_measure="ssim", comparison="per_pass", calibration="none")
    with pytest.warns(UserWarning, match="never trained: PEN-Net's weights are random"):
        Engine(default_root_dir=tmp_path).export(model=model, export_type="torch", export_root=tmp_path)
