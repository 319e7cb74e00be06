"""Lightning DDP on 2 CPU processes (gloo): training stays in sync, scoring matches one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from smai_plugin import Smai

from .conftest import REPO, TINY_MODEL_ARGS, make_tiny_mvtec

pytestmark = pytest.mark.slow

METRIC_TOLERANCE = 1e-5
"""Same weights, same images: metrics of 2 processes and of 1 agree up to float rounding."""

DDP_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from lightning.pytorch import seed_everything
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from smai_plugin import Smai

root, out, model_args = Path(sys.argv[1]), Path(sys.argv[2]), eval(sys.argv[3])
seed_everything(0)
model = Smai(**model_args, visualizer=False)
engine = Engine(
    default_root_dir=out, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False
)
datamodule = MVTecAD(root=root, category="hazelnut_toy", train_batch_size=2, eval_batch_size=2, num_workers=0, seed=0)
engine.fit(model, datamodule=datamodule)
rank = engine.trainer.global_rank
torch.save(model.state_dict(), out / f"state_rank{rank}.pt")
metrics = engine.test(model, datamodule=datamodule)[0]
if rank == 0:
    (out / "result.json").write_text(json.dumps({
        "world_size": engine.trainer.world_size,
        "global_step": engine.trainer.global_step,
        "checkpoint": engine.trainer.checkpoint_callback.best_model_path,
        "metrics": metrics,
    }))
"""


@pytest.fixture(scope="module")
def even_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 test images, so the distributed sampler does not pad a rank with a repeated image."""
    return make_tiny_mvtec(tmp_path_factory.mktemp("ddp_mvtec"), n_train=8, n_good=3, n_defect=3)


def test_ddp_two_cpu_processes(even_root: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    model_args = {**TINY_MODEL_ARGS, "max_steps": 2}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(even_root), str(tmp_path), repr(model_args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    ddp = json.loads((tmp_path / "result.json").read_text())
    assert ddp["world_size"] == 2
    assert ddp["global_step"] == model_args["max_steps"]

    # DDP kept generator, discriminator and the post-processor's statistics identical on both ranks.
    rank0 = torch.load(tmp_path / "state_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "state_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert any(key.startswith("discriminator.") for key in rank0)
    for key in rank0:
        torch.testing.assert_close(rank1[key], rank0[key], rtol=0, atol=0, equal_nan=True, msg=key)
    # ... and both networks were trained (not just left at their initial weights).
    initial = Smai(**model_args, visualizer=False).state_dict()
    for prefix in ("model.generator.", "discriminator."):
        assert any(not torch.equal(rank0[k], initial[k]) for k in rank0 if k.startswith(prefix)), prefix

    # One process, same weights: validation fits the same thresholds, the test gives the same metrics.
    model = Smai(**model_args, visualizer=False)
    engine = Engine(default_root_dir=tmp_path / "single", accelerator="cpu", devices=1, logger=False)
    datamodule = MVTecAD(
        root=even_root, category="hazelnut_toy", train_batch_size=2, eval_batch_size=2, num_workers=0, seed=0
    )
    engine.validate(model, datamodule=datamodule, ckpt_path=ddp["checkpoint"])
    for key, value in model.post_processor.state_dict().items():
        torch.testing.assert_close(value, rank0[f"post_processor.{key}"], rtol=0, atol=METRIC_TOLERANCE, msg=key)
    metrics = engine.test(model, datamodule=datamodule)[0]
    assert metrics.keys() == ddp["metrics"].keys()
    for name, value in metrics.items():
        assert ddp["metrics"][name] == pytest.approx(value, abs=METRIC_TOLERANCE), name
