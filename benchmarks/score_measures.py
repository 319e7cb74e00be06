"""Train SMAI once on a real category, then test it with each score measure.

Prints one row per measure: image AUROC, pixel AUROC, PRO (AUPRO at 30% FPR), test seconds
per image, plus the training wall time. Example (the README's numbers)::

    python benchmarks/score_measures.py --config configs/smai_cpu.yaml \
        --root ../shared/data --category bottle
"""

import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from smai_plugin import Smai
from smai_plugin.anomaly_map import ScoreMeasure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/smai_cpu.yaml"))
    parser.add_argument("--root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("results/score_measures.json"))
    args = parser.parse_args()

    config = yaml.safe_load(args.config.read_text())
    init_args = dict(config["model"]["init_args"])
    if args.max_steps is not None:
        init_args["max_steps"] = args.max_steps
    data_args = config["data"]["init_args"]
    torch.manual_seed(args.seed)
    model = Smai(**init_args)
    datamodule = MVTecAD(
        root=args.root,
        category=args.category,
        train_batch_size=data_args.get("train_batch_size", 8),
        eval_batch_size=data_args.get("eval_batch_size", 8),
        num_workers=data_args.get("num_workers", 2),
        seed=args.seed,
    )
    engine = Engine(default_root_dir="results/benchmark_score_measures", accelerator="cpu", devices=1, logger=False)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start

    rows = []
    for measure in ScoreMeasure:
        model.model.anomaly_map_generator.score_measure = measure
        start = time.perf_counter()
        metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        n_images = len(datamodule.test_data)
        rows.append(
            {
                "score_measure": measure.value,
                "image_AUROC": metrics["image_AUROC"],
                "pixel_AUROC": metrics["pixel_AUROC"],
                "PRO": metrics["pixel_AUPRO"],
                "test_seconds_per_image": (time.perf_counter() - start) / n_images,
            }
        )
    summary = {
        "category": args.category,
        "config": str(args.config),
        "image_size": init_args.get("image_size"),
        "max_steps": init_args["max_steps"],
        "train_seconds": train_seconds,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2))
    print(
        f"\n{args.category}: {init_args['max_steps']} steps at {init_args.get('image_size')}, "
        f"training {train_seconds:.0f} s"
    )
    print("| score measure | image AUROC | pixel AUROC | PRO | test s/image |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['score_measure']} | {row['image_AUROC']:.3f} | {row['pixel_AUROC']:.3f} | {row['PRO']:.3f} "
            f"| {row['test_seconds_per_image']:.2f} |"
        )


if __name__ == "__main__":
    main()
