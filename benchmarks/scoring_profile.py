"""Where SMAI's scoring time goes, per image, in PyTorch eager: SLIC, the inpainting, the measures, the memory.

Times the whole ``Smai.forward`` (pre-processing, scoring, post-processing) and its parts on real
test images at the model's size, at batch 1 and batch 8, after one warm-up call each. The parts
overlap: the difference maps include SLIC, the measures and the memory timed alone below them;
the rest of them is PEN-Net's inpainting. Examples::

    python benchmarks/scoring_profile.py --root ../shared/data
        --ckpt results/Smai/MVTecAD/bottle/latest/weights/lightning/model.ckpt
    python benchmarks/scoring_profile.py --root ../shared/data --config configs/smai_cpu.yaml  # untrained: same cost

(the first on one line).
"""

import time
from collections.abc import Callable
from pathlib import Path

import torch
from anomalib.data.utils import read_image
from common import markdown_table, model_init_args, script_parser

from smai_plugin import Smai
from smai_plugin.pennet import to_signed


def milliseconds_per_image(function: Callable[[], object], batch: int, repeats: int = 3) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats / batch * 1000


def with_count(model: Smai, count: int, images: torch.Tensor) -> object:
    """``model(images)`` inpainting only the ``count`` most suspicious superpixels."""
    kept, model.model.inpainted_superpixels = model.model.inpainted_superpixels, count
    try:
        return model(images)
    finally:
        model.model.inpainted_superpixels = kept


def main() -> None:
    parser = script_parser(__doc__, config_help="without --ckpt (untrained: the same cost)")
    parser.add_argument("--ckpt", type=Path, help="trained checkpoint (else --config, untrained)")
    parser.add_argument("--inpainted-superpixels", type=int, nargs="+", default=[], help="also time these values")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per part, after one warm-up")
    args = parser.parse_args()

    if args.ckpt:
        model = Smai.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    else:
        model = Smai(**model_init_args(args.config)).eval()
    paths = sorted((args.root / args.category / "test").rglob("*.png"))[:8]
    images = model.pre_processor(torch.stack([read_image(path, as_tensor=True) for path in paths]))
    core, scorer = model.model, model.model.anomaly_map_generator
    if model.needs_calibration:  # statistics only change values, not the cost
        core.calibrate([images])

    print(f"{args.ckpt or args.config}: {tuple(images.shape[-2:])} images, {torch.get_num_threads()} torch threads")
    rows = []
    with torch.no_grad():
        parts = {
            "whole `Smai.forward`": lambda x: model(x),
            "torch model, `model.model(x)`": lambda x: core(x),
            "torch model with the reconstruction (test and predict steps)": lambda x: core(x, reconstruct=True),
            **{
                f"`Smai.forward`, inpainted_superpixels={count}": lambda x, count=count: with_count(model, count, x)
                for count in args.inpainted_superpixels
            },
            "difference maps (every measure, before calibration)": lambda x: core.difference_maps(x),
        }
        if scorer is not None:  # the inpainting, at its own size
            parts["SLIC superpixels"] = lambda x: core.masker(core.inpainting_input(x))
            for measure in scorer.measures:
                parts[f"measure `{measure.value}` alone"] = lambda x, m=measure: scorer.dissimilarity.pixel_measure(
                    m, to_signed(core.inpainting_input(x)), to_signed(core.inpainting_input(x))
                )
        if core.memory is not None:
            parts["memory: backbone and nearest normal patches"] = lambda x: core.memory(
                core.memory_embedding(x), x.shape[-2:]
            )
        for name, part in parts.items():
            times = [milliseconds_per_image(lambda b=b, part=part: part(images[:b]), b, args.repeats) for b in (1, 8)]
            rows.append([name, f"{times[0]:.1f}", f"{times[1]:.1f}"])
    print(markdown_table(["part", "ms/image, batch 1", "ms/image, batch 8"], rows))


if __name__ == "__main__":
    main()
