"""The training budget: the trainer's max_steps / max_epochs bound SMAI unless the model sets its own."""

from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch.callbacks import Callback

from smai_plugin import Smai

from .conftest import TINY_MODEL_ARGS
from .test_cli import ANOMALIB, run, tiny_cli_args

pytestmark = pytest.mark.slow

# The tiny model without a budget of its own: the trainer's applies.
UNBOUNDED_ARGS = {key: value for key, value in TINY_MODEL_ARGS.items() if key != "max_steps"}


class IterationCounter(Callback):
    """Counts the training iterations (generator updates) and validations that really run."""

    def __init__(self) -> None:
        self.iterations = 0
        self.validations = 0
        self.global_steps: list[int] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.iterations += 1
        self.global_steps.append(trainer.global_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.validations += 1


def fit(tiny_root: Path, tmp_path: Path, model: Smai, **engine_args) -> tuple[Engine, IterationCounter]:
    counter = IterationCounter()
    engine = Engine(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, callbacks=[counter], **engine_args
    )
    datamodule = MVTecAD(  # 8 training images in batches of 4: 2 iterations per epoch
        root=tiny_root, category="hazelnut_toy", train_batch_size=4, eval_batch_size=5, num_workers=0, seed=0
    )
    engine.fit(model=model, datamodule=datamodule)
    return engine, counter


@pytest.mark.parametrize(
    ("model_args", "engine_args", "iterations"),
    [
        ({}, {"max_steps": 3}, 3),  # the trainer's step budget, counted in iterations
        ({}, {"max_epochs": 1}, 2),  # the trainer's epoch budget
        ({}, {"max_epochs": 3, "max_steps": 5}, 5),  # whichever ends first, as in Lightning
        ({"max_steps": 2}, {"max_epochs": 5}, 2),  # the model's own budget wins
    ],
)
def test_budget_bounds_the_iterations_that_run(
    tiny_root: Path, tmp_path: Path, model_args: dict, engine_args: dict, iterations: int
) -> None:
    torch.manual_seed(0)
    engine, counter = fit(tiny_root, tmp_path, Smai(**UNBOUNDED_ARGS, **model_args, visualizer=False), **engine_args)
    assert counter.iterations == iterations
    # global_step counts iterations (each one generator and one discriminator update) ...
    assert counter.global_steps == list(range(1, iterations + 1))
    assert engine.trainer.global_step == iterations
    # ... and SMAI validates (calibrates, fits thresholds) once, after the last one.
    assert counter.validations == 1
    assert engine.model.model.normal_statistics.is_fitted


def test_cli_trainer_budget_bounds_the_iterations(tiny_root: Path, tmp_path: Path) -> None:
    args = list(tiny_cli_args(tiny_root))
    index = args.index("--model.max_steps")
    del args[index : index + 2]  # no model budget: the trainer's applies
    run(
        [ANOMALIB, "fit", "--model", "Smai", *args, "--trainer.max_steps", "3", "--default_root_dir", str(tmp_path)],
        cwd=tmp_path,
    )
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    # Batches that ran, from Lightning's own loop state: one iteration per batch.
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    assert progress == 3
