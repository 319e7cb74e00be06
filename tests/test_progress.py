"""Long runs show progress: Lightning's (Rich) progress bar moves per batch, with an ETA."""

import itertools
from pathlib import Path

import pytest
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch.callbacks import Callback, RichProgressBar

from smai_plugin import Smai

from .conftest import TINY_MODEL_ARGS

pytestmark = pytest.mark.slow


class BarProbe(Callback):
    """Reads the progress bar's tasks after every batch."""

    def __init__(self) -> None:
        self.train: list[tuple[str, float, float | None]] = []
        self.test: list[tuple[float, float | None, float | None]] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        task = trainer.progress_bar_callback.train_progress_bar
        self.train.append((task.description.strip(), task.completed, task.total))

    def on_test_batch_end(self, trainer, *args) -> None:
        task = trainer.progress_bar_callback.test_progress_bar
        self.test.append((task.completed, task.total, task.time_remaining))


def test_progress_bar_moves_per_batch_with_eta(tiny_root: Path, tmp_path: Path) -> None:
    # 8 training images in batches of 2: 4 batches per epoch; 6 iterations run over 2 epochs.
    model = Smai(**{**TINY_MODEL_ARGS, "max_steps": 6}, visualizer=False)
    probe = BarProbe()
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, callbacks=[probe])
    datamodule = MVTecAD(
        root=tiny_root, category="hazelnut_toy", train_batch_size=2, eval_batch_size=1, num_workers=0, seed=0
    )
    engine.fit(model, datamodule=datamodule)
    assert isinstance(engine.trainer.progress_bar_callback, RichProgressBar)  # Lightning's default
    # "Epoch i/N" announces the last epoch that really runs (N from max_steps, which counts
    # iterations), and the bar advances with every batch.
    assert [description for description, _, _ in probe.train] == ["Epoch 0/1"] * 4 + ["Epoch 1/1"] * 2
    completed = [done for _, done, _ in probe.train]
    assert completed in ([1, 2, 3, 4, 1, 2], [0, 1, 2, 3, 0, 1])  # depending on the callbacks' order
    # The last epoch's bar counts only the 2 batches that run before max_steps stops training.
    assert [total for _, _, total in probe.train] == [4] * 4 + [2] * 2

    # Scoring: every image is inpainted once per superpixel within one test_step; the bar still
    # moves once per batch, and shows a time remaining once it has a speed.
    engine.test(model, datamodule=datamodule)
    completed = [done for done, _, _ in probe.test]
    assert [b - a for a, b in itertools.pairwise(completed)] == [1] * 4
    assert all(total == 5 for _, total, _ in probe.test)
    assert probe.test[-1][2] is not None  # ETA
