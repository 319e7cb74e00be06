"""Compare SMAI's scoring modes: accuracy on a real category, and speed at the paper's size.

1. Trains SMAI with the CPU preset (or loads ``--ckpt``) and scores the test set of a real
   category with every mode: image AUROC, pixel AUROC, PRO, seconds per image.
   The ``windowed`` mode learns on crops (it trains the way it scores), so it gets its own
   model, trained with the same settings and steps (or loaded from ``--windowed-ckpt``).
2. Times every mode at the paper's size (256x256, 77 superpixels, PEN-Net width 32) on
   ``--speed-images`` images in PyTorch eager (timing does not depend on the weights), with its
   peak memory, and prints each mode's speed-up against the paper's leave-one-out, all in one run.

Each mode is timed at the paper's size in a fresh process (after one warm-up image), so its peak
memory (resident-set high-water mark above the level before scoring, sampled every 10 ms) is
not hidden by memory an earlier mode freed. Example (docs/method.md's speed-up)::

    python benchmarks/scoring_modes.py --root ../shared/data --category bottle
"""

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from common import PeakMemory, load_for_scoring, markdown_table, model_init_args, script_parser

from smai_plugin import Smai
from smai_plugin.torch_model import SmaiModel

PAPER_COMPARISON = {"score_measure": "ssim", "comparison": "per_pass", "calibration": "none", "top_k_fraction": 0}
# name: (scoring, local attention at inference, attention budget)
MODES = {
    "leave_one_out": ("leave_one_out", False, 1.0),
    "grouped": ("grouped", False, 1.0),
    "grouped+local": ("grouped", True, 1.0),
    "grouped+local(0.35)": ("grouped", True, 0.35),
    "windowed": ("windowed", False, 1.0),
}


def settings(mode: str) -> dict[str, str | bool | float]:
    """The model arguments that select a mode's inference schedule."""
    scoring, local, budget = MODES[mode]
    return {"scoring": scoring, "local_attention": local, "attention_budget": budget}


def training_of(mode: str) -> str:
    """How a mode's model is trained: on ``windowed`` crops, or on ``whole`` images (the paper's)."""
    return "windowed" if MODES[mode][0] == "windowed" else "whole"


def time_at_paper_size(mode: str, n_images: int) -> tuple[float, float]:
    """Seconds per image and peak MiB of one mode at 256x256, K=77, width 32 (weights do not matter)."""
    torch.manual_seed(0)
    model = SmaiModel(n_superpixels=77, base_channels=32, passes_per_batch=16, **settings(mode)).eval()
    images = torch.rand(n_images + 1, 3, 256, 256)
    with torch.no_grad():
        model(images[:1])  # warm-up: oneDNN builds its kernels on the first call
        with PeakMemory() as memory:
            start = time.perf_counter()
            for image in images[1:]:
                model(image[None])
            seconds = (time.perf_counter() - start) / n_images
    return seconds, memory.peak_mib


def train_or_load(engine: Engine, datamodule: MVTecAD, init_args: dict, ckpt: Path | None) -> tuple[Path, float | None]:
    """A checkpoint of the config: ``ckpt``, or trained here (seconds returned)."""
    if ckpt is not None:
        return ckpt, None
    torch.manual_seed(0)
    model = Smai(**init_args)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    path = Path(engine.trainer.default_root_dir) / f"{init_args['scoring']}.ckpt"
    engine.trainer.save_checkpoint(path)
    return path, seconds


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--ckpt", type=Path, default=None, help="whole-image checkpoint of the config (skips training)")
    parser.add_argument("--windowed-ckpt", type=Path, default=None, help="windowed checkpoint (skips its training)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--speed-images", type=int, default=2)
    parser.add_argument("--speed-only", action="store_true", help="only time the modes at the paper's size")
    parser.add_argument("--output", type=Path, default=Path("results/scoring_modes.json"))
    args = parser.parse_args()

    # The schedules compared with the paper's measure, uncalibrated (as the paper scores).
    init_args = model_init_args(args.config, **PAPER_COMPARISON)
    datamodule = MVTecAD(
        root=args.root, category=args.category, train_batch_size=8, eval_batch_size=8, num_workers=2, seed=0
    )
    engine = Engine(default_root_dir="results/benchmark_scoring_modes", accelerator="cpu", devices=1, logger=False)
    checkpoints, train_seconds = {}, {}
    for training in [] if args.speed_only else sorted({training_of(name) for name in args.modes}):
        scoring = {"scoring": "windowed" if training == "windowed" else "leave_one_out"}
        ckpt = args.windowed_ckpt if training == "windowed" else args.ckpt
        checkpoints[training], train_seconds[training] = train_or_load(engine, datamodule, init_args | scoring, ckpt)

    rows = []
    for name in [] if args.speed_only else args.modes:
        training = training_of(name)
        model = load_for_scoring(checkpoints[training], **PAPER_COMPARISON, **settings(name))
        start = time.perf_counter()
        metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        seconds = (time.perf_counter() - start) / len(datamodule.test_data)
        rows.append(
            {
                "mode": name,
                "training": training,
                "train_s": train_seconds[training],
                "image_AUROC": metrics["image_AUROC"],
                "pixel_AUROC": metrics["pixel_AUROC"],
                "PRO": metrics["pixel_AUPRO"],
                "test_s_per_image": seconds,
            }
        )

    rows = rows or [{"mode": name} for name in args.modes]

    # Speed at the paper's size, PyTorch eager, one fresh process per mode, one after the other.
    for row in rows:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            row["paper_s_per_image"], row["paper_peak_MiB"] = pool.submit(
                time_at_paper_size, row["mode"], args.speed_images
            ).result()
    baseline = next((r["paper_s_per_image"] for r in rows if r["mode"] == "leave_one_out"), None)
    for row in rows:
        row["speedup_vs_leave_one_out"] = baseline / row["paper_s_per_image"] if baseline else None

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"category": args.category, "config": str(args.config), "rows": rows}, indent=2))
    print(f"\n{args.category}, accuracy with {args.config} ({init_args['image_size']}); speed at 256x256, K=77, c=32")
    columns = ["mode", "trained on", "train s", "image AUROC", "pixel AUROC", "PRO", "s/image (test)"]
    columns += ["s/image 256", "peak MiB 256", "speed-up"]
    cells = []
    for r in rows:
        speedup = f"{r['speedup_vs_leave_one_out']:.1f}x" if r["speedup_vs_leave_one_out"] else "-"
        trained = {"windowed": "crops", "whole": "images"}.get(r.get("training"), "-")
        train = "-" if "training" not in r else "(ckpt)" if r["train_s"] is None else f"{r['train_s']:.0f}"
        accuracy = [f"{r[key]:.3f}" if key in r else "-" for key in ("image_AUROC", "pixel_AUROC", "PRO")]
        test_seconds = f"{r['test_s_per_image']:.2f}" if "test_s_per_image" in r else "-"
        paper = [f"{r['paper_s_per_image']:.2f}", f"{r['paper_peak_MiB']:.0f}", speedup]
        cells.append([r["mode"], trained, train, *accuracy, test_seconds, *paper])
    print(markdown_table(columns, cells))


if __name__ == "__main__":
    main()
