"""Seconds per training iteration of SMAI's two trainings: whole images (paper) and crops (windowed).

Fits the same config twice per training through anomalib's Engine (``--short`` and ``--long``
iterations, validation off) and reports the difference per iteration, which leaves out start-up
and data set-up. Both trainings alternate in one run. Example::

    python benchmarks/training_cost.py --config configs/smai_cpu.yaml --root ../shared/data
"""

import tempfile
import time
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from common import markdown_table, model_init_args, script_parser

from smai_plugin import Smai


def fit_seconds(init_args: dict, datamodule: MVTecAD, steps: int, work: Path) -> float:
    """Wall time of one ``Engine.fit`` of ``steps`` iterations without validation."""
    torch.manual_seed(0)
    model = Smai(**(init_args | {"max_steps": steps}))
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    engine = Engine(default_root_dir=work, limit_val_batches=0, **options)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    return time.perf_counter() - start


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=25)
    args = parser.parse_args()

    init_args = model_init_args(args.config)
    datamodule = MVTecAD(root=args.root, category=args.category, train_batch_size=8, num_workers=0, seed=0)
    seconds = {"leave_one_out": [], "windowed": []}
    with tempfile.TemporaryDirectory() as work:
        for steps in (args.short, args.long):
            for scoring, runs in seconds.items():
                runs.append(fit_seconds(init_args | {"scoring": scoring}, datamodule, steps, Path(work)))
    per_step = {scoring: (long - short) / (args.long - args.short) for scoring, (short, long) in seconds.items()}
    print(f"\n{args.config} ({init_args['image_size']}, batch 8, {init_args['n_masked']} masked per image)")
    names = {"leave_one_out": "whole images (leave_one_out, grouped)", "windowed": "64x64 crops (windowed)"}
    rows = [
        [names[scoring], f"{value:.2f}", f"{value / per_step['leave_one_out']:.2f}"]
        for scoring, value in per_step.items()
    ]
    print(markdown_table(["training", "s/iteration", "relative"], rows))


if __name__ == "__main__":
    main()
