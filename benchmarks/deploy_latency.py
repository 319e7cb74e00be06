"""Latency per image of SMAI in PyTorch eager against the OpenVINO export, in one run.

Builds SMAI from a config (weights and statistics do not change the cost), exports it with anomalib's
OpenVINO export, and times ``--images`` real images through the torch model (``Smai.forward``:
pre-processing, scoring, post-processing) and through anomalib's ``OpenVINOInferencer`` in
float32 (the parity setting) and in the CPU's default precision. Examples::

    python benchmarks/deploy_latency.py --config configs/smai_cpu.yaml --root ../shared/data
    python benchmarks/deploy_latency.py --config configs/smai.yaml  # paper size (windowed)
    python benchmarks/deploy_latency.py --config configs/smai.yaml --scoring grouped
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import OpenVINOInferencer
from common import model_init_args

from smai_plugin import Smai


def seconds_per_image(predict: callable, images: list) -> float:
    predict(images[0])  # warm-up
    start = time.perf_counter()
    for image in images:
        predict(image)
    return (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/smai_cpu.yaml"))
    parser.add_argument("--root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--scoring", help="override the config's scoring")
    args = parser.parse_args()

    init_args = model_init_args(args.config, **({"scoring": args.scoring} if args.scoring else {}))
    model = Smai(**init_args).eval()
    paths = sorted((args.root / args.category / "test").rglob("*.png"))[: args.images]
    images = [read_image(path, as_tensor=False).astype(np.float32) for path in paths]
    # Calibrated on a few training images: an export needs statistics (their values do not change the cost).
    train = sorted((args.root / args.category / "train").rglob("*.png"))[:4]
    batch = torch.stack([read_image(path, as_tensor=True) for path in train])
    model.model.calibrate([model.pre_processor(batch)])

    with torch.no_grad():
        eager = seconds_per_image(lambda image: model(torch.from_numpy(image).permute(2, 0, 1)[None]), images)
    with tempfile.TemporaryDirectory() as export_root:
        xml = model.to_openvino(export_root)
        openvino_f32 = seconds_per_image(
            OpenVINOInferencer(xml, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"}).predict, images
        )
        openvino_default = seconds_per_image(OpenVINOInferencer(xml, device="CPU").predict, images)

    print(
        f"\n{args.config}: {init_args.get('scoring')} scoring, {init_args.get('image_size')}, "
        f"{torch.get_num_threads()} torch threads, {len(images)} {args.category} images"
    )
    print("| runtime | s/image | speed-up vs torch eager |")
    print("|---|---|---|")
    for name, seconds in [
        ("PyTorch eager", eager),
        ("OpenVINO f32 (parity)", openvino_f32),
        ("OpenVINO CPU default precision", openvino_default),
    ]:
        print(f"| {name} | {seconds:.3f} | {eager / seconds:.2f}x |")


if __name__ == "__main__":
    main()
