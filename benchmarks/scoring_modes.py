"""Compare SMAI's scoring modes: accuracy on a real category, and speed at the paper's size.

1. Trains SMAI once (or loads ``--ckpt``) with the CPU preset and scores the test set of a real
   category with every mode: image AUROC, pixel AUROC, PRO, seconds per image, peak memory.
2. Times every mode at the paper's size (256x256, 77 superpixels, PEN-Net width 32) on
   ``--speed-images`` images in PyTorch eager (timing does not depend on the weights), and
   prints each mode's speed-up against the paper's leave-one-out, all in one run.

Peak memory is the process's resident-set high-water mark above the level before the mode
ran, sampled every 10 ms. Example (the README's numbers)::

    python benchmarks/scoring_modes.py --root ../shared/data --category bottle
"""

import argparse
import json
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from smai_plugin import Smai
from smai_plugin.torch_model import SmaiModel

# name: (scoring, local attention at inference, attention budget)
MODES = {
    "leave_one_out": ("leave_one_out", False, 1.0),
    "grouped": ("grouped", False, 1.0),
    "grouped+local": ("grouped", True, 1.0),
    "grouped+local(0.35)": ("grouped", True, 0.35),
}


class PeakMemory:
    """Resident-set high-water mark (MiB) above the level at entry, sampled in a thread."""

    def __enter__(self) -> "PeakMemory":
        self._process = psutil.Process()
        self._base = self._process.memory_info().rss
        self.peak_mib = 0.0
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak_mib = max(self.peak_mib, (self._process.memory_info().rss - self._base) / 2**20)
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()


def configure(model: SmaiModel, scoring: str, local: bool, budget: float) -> None:
    """Switch a trained model's inference mode in place (weights unchanged)."""
    from smai_plugin.torch_model import ScoringMode

    model.scoring = ScoringMode(scoring)
    for level in model.generator.attention:
        level.local = local
    model.attention_budget = budget
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/smai_cpu.yaml"))
    parser.add_argument("--root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--ckpt", type=Path, default=None, help="trained checkpoint of the config (skips training)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--speed-images", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("results/scoring_modes.json"))
    args = parser.parse_args()

    init_args = yaml.safe_load(args.config.read_text())["model"]["init_args"]
    datamodule = MVTecAD(
        root=args.root, category=args.category, train_batch_size=8, eval_batch_size=8, num_workers=2, seed=0
    )
    engine = Engine(default_root_dir="results/benchmark_scoring_modes", accelerator="cpu", devices=1, logger=False)
    torch.manual_seed(0)
    if args.ckpt is None:
        model = Smai(**init_args)
        engine.fit(model=model, datamodule=datamodule)
    else:
        model = Smai.load_from_checkpoint(args.ckpt, **init_args)

    rows = []
    for name in args.modes:
        configure(model.model, *MODES[name])
        start = time.perf_counter()
        with PeakMemory() as memory:
            metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        seconds = (time.perf_counter() - start) / len(datamodule.test_data)
        rows.append(
            {
                "mode": name,
                "image_AUROC": metrics["image_AUROC"],
                "pixel_AUROC": metrics["pixel_AUROC"],
                "PRO": metrics["pixel_AUPRO"],
                "test_s_per_image": seconds,
                "test_peak_MiB": memory.peak_mib,
            }
        )

    # Speed at the paper's size, PyTorch eager, same process, one mode after the other.
    paper = SmaiModel(n_superpixels=77, base_channels=32, passes_per_batch=16)
    images = torch.rand(args.speed_images, 3, 256, 256)
    for row in rows:
        configure(paper, *MODES[row["mode"]])
        with torch.no_grad(), PeakMemory() as memory:
            start = time.perf_counter()
            for image in images:
                paper(image[None])
            row["paper_s_per_image"] = (time.perf_counter() - start) / len(images)
        row["paper_peak_MiB"] = memory.peak_mib
    baseline = next((r["paper_s_per_image"] for r in rows if r["mode"] == "leave_one_out"), None)
    for row in rows:
        row["speedup_vs_leave_one_out"] = baseline / row["paper_s_per_image"] if baseline else None

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"category": args.category, "config": str(args.config), "rows": rows}, indent=2))
    print(f"\n{args.category}, accuracy with {args.config} ({init_args['image_size']}); speed at 256x256, K=77, c=32")
    print(
        "| mode | image AUROC | pixel AUROC | PRO | s/image (test) | peak MiB (test) | s/image 256 | "
        "peak MiB 256 | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{r['speedup_vs_leave_one_out']:.1f}x" if r["speedup_vs_leave_one_out"] else "-"
        print(
            f"| {r['mode']} | {r['image_AUROC']:.3f} | {r['pixel_AUROC']:.3f} | {r['PRO']:.3f} | "
            f"{r['test_s_per_image']:.2f} | {r['test_peak_MiB']:.0f} | {r['paper_s_per_image']:.1f} | "
            f"{r['paper_peak_MiB']:.0f} | {speedup} |"
        )


if __name__ == "__main__":
    main()
