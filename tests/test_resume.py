"""Interrupted training loses nothing: kill a real training process, resume from its checkpoint."""

import copy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from smai_plugin import Smai

from .conftest import REPO, TINY_MODEL_ARGS

pytestmark = pytest.mark.slow

MAX_STEPS = 4  # training iterations (global_step counts iterations)
EVERY_N_STEPS = 2  # a checkpoint every 2 iterations

TRAIN_SCRIPT = """
import sys, time
from pathlib import Path
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from smai_plugin import Smai

root, out, model_args, every_n = Path(sys.argv[1]), Path(sys.argv[2]), eval(sys.argv[3]), int(sys.argv[4])
pause_in = sys.argv[5]  # "training" or "calibration": where the test kills the process


class Slow(Callback):
    # Slow enough that the test kills the process between two checkpoints, or while it calibrates.
    def on_train_batch_end(self, *args):
        if pause_in == "training":
            time.sleep(1.0)

    def on_validation_start(self, *args):  # runs before SMAI's calibration, which starts the validation
        if pause_in == "calibration":
            (out / "calibrating").touch()
            time.sleep(600)


seed_everything(0)
checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=every_n, save_last=True, save_top_k=-1)
engine = Engine(default_root_dir=out, accelerator="cpu", devices=1, logger=False, callbacks=[checkpoint, Slow()])
datamodule = MVTecAD(root=root, category="hazelnut_toy", train_batch_size=4, eval_batch_size=5, num_workers=0, seed=0)
engine.fit(Smai(**model_args, visualizer=False), datamodule=datamodule)
print("TRAINING FINISHED")
"""


class Probe(Callback):
    """Records what the resumed trainer starts from, and what it runs."""

    def __init__(self) -> None:
        self.start: dict = {}
        self.train_batches = 0
        self.validations = 0

    def on_train_start(self, trainer, pl_module) -> None:
        # Runs after Lightning restored the checkpoint's weights, loops and optimisers.
        self.start = {
            "global_step": trainer.global_step,
            "optimizers": [copy.deepcopy(optimizer.state_dict()) for optimizer in trainer.optimizers],
            "state_dict": {key: value.detach().clone() for key, value in pl_module.state_dict().items()},
        }

    def on_train_batch_end(self, *args) -> None:
        self.train_batches += 1

    def on_validation_start(self, *args) -> None:
        self.validations += 1


def assert_same(actual: object, expected: object, where: str = "") -> None:
    """Exact equality of nested dicts / lists of tensors and plain values."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


def start_and_kill(tiny_root: Path, out: Path, pause_in: str = "training", timeout: float = 240.0) -> Path:
    """Start a real training process; SIGKILL it once its first checkpoint is on disk, or once it calibrates."""
    script = out / "train.py"
    out.mkdir(parents=True, exist_ok=True)
    script.write_text(TRAIN_SCRIPT)
    model_args = {**TINY_MODEL_ARGS, "max_steps": MAX_STEPS}
    process = subprocess.Popen(
        [sys.executable, str(script), str(tiny_root), str(out), repr(model_args), str(EVERY_N_STEPS), pause_in],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = out / "checkpoints" / "last.ckpt"
    signal_file = last if pause_in == "training" else out / "calibrating"
    deadline = time.monotonic() + timeout
    try:
        while not signal_file.exists():
            assert process.poll() is None, process.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert "TRAINING FINISHED" not in output
    return last


def resume(tiny_root: Path, last: Path, out: Path, seed: int) -> tuple[Engine, Smai, Probe]:
    torch.manual_seed(seed)  # a new process's random state, which the checkpoint's replaces
    probe = Probe()
    model = Smai(**{**TINY_MODEL_ARGS, "max_steps": MAX_STEPS}, visualizer=False)
    callbacks = [ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=EVERY_N_STEPS), probe]
    engine = Engine(default_root_dir=out, accelerator="cpu", devices=1, logger=False, callbacks=callbacks)
    datamodule = MVTecAD(
        root=tiny_root, category="hazelnut_toy", train_batch_size=4, eval_batch_size=5, num_workers=0, seed=0
    )
    engine.fit(model, datamodule=datamodule, ckpt_path=last)
    return engine, model, probe


def test_killed_training_resumes_from_checkpoint(tiny_root: Path, tmp_path: Path) -> None:
    last = start_and_kill(tiny_root, tmp_path / "run")
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    budget = MAX_STEPS
    killed_at = checkpoint["global_step"]
    assert 0 < killed_at < budget, killed_at  # killed mid-training
    assert len(checkpoint["optimizer_states"]) == 2  # generator and discriminator
    for state in checkpoint["optimizer_states"]:
        assert state["state"], "optimiser state (Adam moments) missing from the checkpoint"

    engine, model, probe = resume(tiny_root, last, tmp_path / "resumed", seed=1)
    # It continued from the checkpoint, with both optimisers' state (Adam moments, step counts)
    # and the weights of generator and discriminator exactly as saved.
    assert probe.start["global_step"] == killed_at
    assert_same(probe.start["optimizers"], checkpoint["optimizer_states"], "optimizer_states")
    assert_same(probe.start["state_dict"], checkpoint["state_dict"], "state_dict")
    # ... and ran the rest of the budget, one iteration per batch, then validated once (which
    # calibrates and fits the post-processor's thresholds).
    assert engine.trainer.global_step == budget
    assert probe.train_batches == budget - killed_at
    assert probe.validations == 1
    assert torch.isfinite(model.post_processor._image_threshold)
    # The checkpoint of the last iteration was saved before that validation, and again after it, complete.
    final = torch.load(engine.trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=False)
    assert final["global_step"] == budget
    assert not final["smai_calibration_stale"]
    assert torch.isfinite(final["state_dict"]["post_processor._image_threshold"])

    # The random state (holes, shuffling) comes from the checkpoint, not from the new process:
    # resuming again after another seed ends with the same weights.
    again_engine, again, _ = resume(tiny_root, last, tmp_path / "resumed_again", seed=2)
    assert_same(again.state_dict(), model.state_dict(), "state_dict after resuming twice")

    # anomalib's Engine.train (`anomalib train --ckpt_path`) tests with the same ckpt_path, i.e. the
    # half-trained checkpoint it resumed from, not the model it just trained: SMAI warns.
    datamodule = MVTecAD(
        root=tiny_root, category="hazelnut_toy", train_batch_size=4, eval_batch_size=5, num_workers=0, seed=0
    )
    with pytest.warns(UserWarning, match=rf"checkpoint of step {killed_at}, not the model .* to step {budget}"):
        again_engine.test(again, datamodule=datamodule, ckpt_path=last)


def test_killed_while_calibrating_resumes_to_a_checkpoint_that_exports(tiny_root: Path, tmp_path: Path) -> None:
    """Killed after its last iteration, while it calibrates: the resumed fit validates, calibrates, saves."""
    last = start_and_kill(tiny_root, tmp_path / "run", pause_in="calibration")
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == MAX_STEPS  # the budget is spent: Lightning skips the training loop
    assert checkpoint["smai_calibration_stale"]

    engine, model, probe = resume(tiny_root, last, tmp_path / "resumed", seed=1)
    assert probe.train_batches == 0
    assert probe.validations == 1  # the validation the kill cut short
    assert not model.needs_calibration
    assert torch.isfinite(model.post_processor._image_threshold)
    # The checkpoint resumed from is written again, complete: same weights, calibrated, thresholds fitted.
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert not saved["smai_calibration_stale"]
    assert torch.isfinite(saved["state_dict"]["post_processor._image_threshold"])
    generator = [key for key in checkpoint["state_dict"] if key.startswith("model.generator.")]
    assert_same({k: saved["state_dict"][k] for k in generator}, {k: checkpoint["state_dict"][k] for k in generator})
    loaded = Smai.load_from_checkpoint(last)
    assert not loaded.needs_calibration
    exported = engine.export(model=loaded, export_type="torch", export_root=tmp_path / "export")
    assert exported.is_file()
