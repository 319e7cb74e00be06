"""Same seed, same model; checkpoints give back the same scores, also under ``weights_only`` loading."""

import warnings
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from smai_plugin import Smai

from .conftest import TINY_MODEL_ARGS

pytestmark = pytest.mark.slow


def datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="hazelnut_toy", train_batch_size=4, eval_batch_size=5, num_workers=0, seed=0)


def engine(root_dir: Path) -> Engine:
    return Engine(default_root_dir=root_dir, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)


def train(tiny_root: Path, root_dir: Path, seed: int) -> tuple[Smai, Engine]:
    seed_everything(seed)
    model = Smai(**TINY_MODEL_ARGS, visualizer=False)
    trainer = engine(root_dir)
    trainer.fit(model, datamodule=datamodule(tiny_root))
    return model, trainer


def scores(trainer: Engine, model: Smai, tiny_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batches = trainer.predict(model, datamodule=datamodule(tiny_root))
    return torch.cat([b.pred_score for b in batches]), torch.cat([b.anomaly_map for b in batches])


def assert_state_dicts_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=1e-6, equal_nan=True, msg=key)


@pytest.fixture(scope="module")
def trained(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Smai, Engine]:
    return train(tiny_root, tmp_path_factory.mktemp("seed0"), seed=0)


def test_same_seed_same_weights_and_scores(trained: tuple[Smai, Engine], tiny_root: Path, tmp_path: Path) -> None:
    model, trainer = trained
    again, again_trainer = train(tiny_root, tmp_path / "again", seed=0)
    assert_state_dicts_equal(again.state_dict(), model.state_dict())
    score, anomaly_map = scores(trainer, model, tiny_root)
    again_score, again_map = scores(again_trainer, again, tiny_root)
    torch.testing.assert_close(again_score, score, rtol=0, atol=1e-6)
    torch.testing.assert_close(again_map, anomaly_map, rtol=0, atol=1e-6)

    # The comparison can fail: another seed trains other weights.
    other, _ = train(tiny_root, tmp_path / "other", seed=1)
    generator = "model.generator."
    assert any(
        not torch.equal(value, model.state_dict()[key])
        for key, value in other.state_dict().items()
        if key.startswith(generator)
    )


def test_checkpoint_round_trip(trained: tuple[Smai, Engine], tiny_root: Path, tmp_path: Path) -> None:
    model, trainer = trained
    path = Path(
        trainer.trainer.checkpoint_callback.best_model_path or trainer.trainer.checkpoint_callback.last_model_path
    )
    assert path.is_file()
    # Plain torch refuses SMAI's enums under weights_only unless they are allowlisted ...
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert {type(v).__name__ for v in checkpoint["hyper_parameters"].values()} >= {"ScoringMode", "Calibration"}
    # ... which Smai.checkpoint_safe_globals does for anomalib's loaders (weights_only=True by default).
    loaded = Smai.load_from_checkpoint(path, visualizer=False)
    assert_state_dicts_equal(loaded.state_dict(), model.state_dict())
    score, anomaly_map = scores(trainer, model, tiny_root)
    loaded_score, loaded_map = scores(engine(tmp_path / "loaded"), loaded, tiny_root)
    torch.testing.assert_close(loaded_score, score, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded_map, anomaly_map, rtol=0, atol=1e-6)

    # Engine's ckpt_path restore (anomalib's CheckpointIO, also weights_only) gives the same metrics.
    expected = trainer.test(model, datamodule=datamodule(tiny_root))[0]
    fresh = Smai(**TINY_MODEL_ARGS, visualizer=False)
    restored = engine(tmp_path / "restored").test(fresh, datamodule=datamodule(tiny_root), ckpt_path=path)[0]
    assert restored.keys() == expected.keys()
    for name, value in expected.items():
        assert restored[name] == pytest.approx(value, abs=1e-6), name


def test_scoring_with_another_training_family_warns(trained: tuple[Smai, Engine]) -> None:
    model, trainer = trained
    path = trainer.trainer.checkpoint_callback.best_model_path or trainer.trainer.checkpoint_callback.last_model_path
    assert torch.load(path, weights_only=False)["smai_trained_on"] == model.model.training_family
    with pytest.warns(UserWarning, match=r"trained on 64x64 crops .* set to score with whole images"):
        Smai.load_from_checkpoint(path, scoring="leave_one_out", visualizer=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Smai.load_from_checkpoint(path, visualizer=False)  # the scoring it was trained for
    assert not [warning for warning in caught if "trained on" in str(warning.message)]
