"""Quality against training budget: one training run of SMAI, tested after each stage.

Trains a config through anomalib's Engine to each iteration count of ``--steps`` in turn (each
stage resumes from the checkpoint of the one before, so the stages form one training run with
one seed), tests after every stage with the config's scoring (calibrated again on the training
images) and prints image AUROC, pixel AUROC, PRO, seconds per iteration and test seconds per
image. A stage predicted to end after ``--budget`` seconds is skipped, so the script fits a
time slot. Uses the GPU where there is one; a stage that resumes mid-epoch draws a new shuffle
(Lightning warns that the loader is not resumable), so the images come in another order than in
one uninterrupted run. Example (on a GPU; a time budget may leave out the longest stages)::

    python benchmarks/training_curve.py --config configs/smai_cpu.yaml --root ../shared/data \\
        --steps 1000 2500 6000 12000 --workers 8 --budget 320
"""

import csv
import tempfile
import time
from pathlib import Path

from anomalib.data import MVTecAD
from anomalib.engine import Engine
from common import data_init_args, format_cell, markdown_table, model_init_args, script_parser
from lightning import seed_everything
from torch.utils.data import DataLoader

from smai_plugin import Smai
from smai_plugin.benchmark.runner import evaluator

METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")


class PersistentWorkersMVTecAD(MVTecAD):
    """MVTec AD whose training loader keeps its worker processes across epochs.

    An epoch of bottle is 27 batches: on a GPU, restarting the workers every epoch would cost
    about as much as the epoch itself.
    """

    def train_dataloader(self) -> DataLoader:
        """The parent's training loader, with persistent workers when there are any."""
        loader = super().train_dataloader()
        if not self.num_workers:
            return loader
        return DataLoader(
            loader.dataset,
            batch_size=self.train_batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=loader.collate_fn,
            persistent_workers=True,
            pin_memory=True,
        )


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 3000, 10000], help="iterations of each stage")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds for the whole script")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the training run (default: %(default)s)")
    parser.add_argument("--output", type=Path, help="also write the rows to this CSV file, one per stage")
    args = parser.parse_args()
    start = time.perf_counter()

    seed_everything(args.seed)
    init_args = model_init_args(args.config, evaluator=evaluator(), post_processor=False, visualizer=False)
    data_args = data_init_args(args.config)
    datamodule = PersistentWorkersMVTecAD(
        root=args.root,
        category=args.category,
        train_batch_size=data_args["train_batch_size"],
        eval_batch_size=data_args["eval_batch_size"],
        num_workers=args.workers,
        seed=args.seed,
    )
    header = ["iterations", "image AUROC", "pixel AUROC", "PRO", "train s/iteration", "test s/image"]
    rows: list[list] = []
    options = {"accelerator": "auto", "devices": 1, "logger": False, "enable_progress_bar": False}
    checkpoint, done, seconds_per_step, test_seconds = None, 0, None, 0.0
    with tempfile.TemporaryDirectory() as work:
        for steps in sorted(set(args.steps)):
            if seconds_per_step is not None:
                predicted_end = time.perf_counter() - start + (steps - done) * seconds_per_step + test_seconds
                if predicted_end > args.budget:
                    print(f"Skipping {steps} iterations and beyond: predicted to end at {predicted_end:.0f} s.")
                    break
            model = Smai(**(init_args | {"max_steps": steps}))
            engine = Engine(default_root_dir=work, limit_val_batches=0, **options)
            fit_start = time.perf_counter()
            engine.fit(model=model, datamodule=datamodule, ckpt_path=checkpoint)
            seconds_per_step = (time.perf_counter() - fit_start) / (steps - done)
            checkpoint, done = Path(work) / f"{steps}.ckpt", steps
            engine.trainer.save_checkpoint(checkpoint)
            test_start = time.perf_counter()
            results = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
            test_seconds = time.perf_counter() - test_start  # calibration on the training images included
            per_image = test_seconds / len(datamodule.test_data)
            rows.append([steps, *(results[name] for name in METRICS), seconds_per_step, per_image])
            print(f"stage done at {time.perf_counter() - start:.0f} s: {dict(zip(header, rows[-1], strict=True))}")
            if args.output:
                with args.output.open("w", newline="") as file:
                    csv.writer(file).writerows([header, *rows])
    print(f"\n{args.config}, {args.category}, seed {args.seed}, test time includes calibration")
    print(markdown_table(header, [[format_cell(value) for value in row] for row in rows]))


if __name__ == "__main__":
    main()
