"""SMAI deployed: PyTorch eager against the OpenVINO export in float32 and in the CPU's default precision.

Exports SMAI with anomalib's OpenVINO export and runs every test image of a category through the
torch model (``Smai.forward``: pre-processing, scoring, post-processing) and through anomalib's
``OpenVINOInferencer`` with ``INFERENCE_PRECISION_HINT: f32`` (the parity setting) and as an
OpenVINO user calls it (``OpenVINOInferencer(path, device="CPU")``: bf16 on CPUs that have it). Per
runtime it prints seconds per image at batch 1, images per second at batch 8, and, with ``--ckpt``
(a trained checkpoint), image AUROC, pixel AUROC and PRO of the deployed outputs and the largest
difference of their anomaly maps from torch's. ``--compression`` adds exports compressed by
anomalib's export (``fp16`` weights, ``int8`` weights, ``int8_ptq`` post-training quantisation).
Without ``--ckpt`` the model is untrained and calibrated on a few training images (weights do not
change the cost), and only speed is printed.

Examples::

    python benchmarks/deploy_latency.py --ckpt results/Smai/MVTecAD/bottle/latest/weights/lightning/model.ckpt
    python benchmarks/deploy_latency.py --ckpt <model.ckpt> --compression fp16 int8 int8_ptq
    python benchmarks/deploy_latency.py --config configs/smai_cpu.yaml --images 8  # speed only
    python benchmarks/deploy_latency.py --config configs/smai.yaml --scoring grouped
"""

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from anomalib.data import ImageBatch, MVTecAD
from anomalib.data.utils import read_image
from anomalib.deploy import CompressionType, OpenVINOInferencer
from anomalib.metrics import AUPRO, AUROC
from common import model_init_args
from torch.nn import functional as F  # noqa: N812

from smai_plugin import Smai

Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # (N, 3, H, W) -> scores (N,), maps (N, H, W)


def torch_predict(model: Smai) -> Predict:
    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            result = model(torch.from_numpy(images))
        return result.pred_score.reshape(-1).numpy(), result.anomaly_map.reshape(
            len(images), *result.anomaly_map.shape[-2:]
        ).numpy()

    return predict


def openvino_predict(inferencer: OpenVINOInferencer) -> Predict:
    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = inferencer.predict(images)
        maps = np.asarray(result.anomaly_map)
        return np.asarray(result.pred_score).reshape(-1), maps.reshape(len(images), *maps.shape[-2:])

    return predict


def seconds_per_call(predict: Predict, batches: list[np.ndarray]) -> float:
    predict(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        predict(batch)
    return (time.perf_counter() - start) / len(batches)


def metrics(scores: np.ndarray, maps: np.ndarray, labels: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Image AUROC, pixel AUROC and PRO (AUPRO to 30% false positives) with anomalib's metrics.

    The masks are resized (nearest) to the maps' size, the size the model scores at, as anomalib's
    pre-processor resizes them in ``anomalib test``.
    """
    masks = F.interpolate(masks[:, None].float(), size=maps.shape[-2:], mode="nearest")[:, 0].bool()
    batch = ImageBatch(
        image=torch.zeros(len(scores), 3, *maps.shape[-2:]),
        gt_label=labels,
        gt_mask=masks,
        pred_score=torch.from_numpy(scores),
        anomaly_map=torch.from_numpy(maps),
    )
    values = {}
    for name, metric in [
        ("image AUROC", AUROC(fields=["pred_score", "gt_label"])),
        ("pixel AUROC", AUROC(fields=["anomaly_map", "gt_mask"])),
        ("PRO", AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3)),
    ]:
        metric.update(batch)
        values[name] = float(metric.compute())
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="trained checkpoint: adds accuracy on the test split")
    parser.add_argument("--config", type=Path, default=Path("configs/smai_cpu.yaml"), help="without --ckpt")
    parser.add_argument("--root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--images", type=int, help="test images used (default: all with --ckpt, else 8)")
    parser.add_argument("--scoring", help="override the config's scoring (without --ckpt)")
    parser.add_argument(
        "--compression",
        nargs="*",
        default=[],
        choices=[kind.value for kind in CompressionType],
        help="also export with anomalib's compression (NNCF: pip install 'smai-plugin[openvino]')",
    )
    args = parser.parse_args()

    if args.ckpt:
        model = Smai.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
        label = f"{args.ckpt}"
    else:
        init_args = model_init_args(args.config, **({"scoring": args.scoring} if args.scoring else {}))
        model = Smai(**init_args).eval()
        label = f"{args.config} (untrained), {init_args.get('scoring')} scoring"
    datamodule = MVTecAD(root=args.root, category=args.category, eval_batch_size=8, num_workers=0)
    datamodule.setup()
    if model._needs_calibration:  # an export needs statistics; here from training images
        train = sorted((args.root / args.category / "train").rglob("*.png"))[: None if args.ckpt else 4]
        batches = torch.stack([read_image(path, as_tensor=True) for path in train]).split(8)
        model.model.calibrate(model.pre_processor(batch) for batch in batches)
    test = list(datamodule.test_dataloader())
    images = torch.cat([batch.image for batch in test])[: args.images or (None if args.ckpt else 8)]
    labels = torch.cat([batch.gt_label for batch in test])[: len(images)]
    masks = torch.cat([batch.gt_mask for batch in test])[: len(images)]
    singles = [image[None].numpy() for image in images]
    eights = [batch.numpy() for batch in images.split(8) if len(batch) == 8] or [images.numpy()]

    with tempfile.TemporaryDirectory() as export_root:
        xml = model.to_openvino(export_root)
        runtimes = {
            "PyTorch eager": torch_predict(model),
            "OpenVINO f32 (parity)": openvino_predict(
                OpenVINOInferencer(xml, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
            ),
            "OpenVINO CPU default precision": openvino_predict(OpenVINOInferencer(xml, device="CPU")),
        }
        for kind in args.compression:  # int8_ptq/int8_acq calibrate on the datamodule (anomalib's choice of split)
            compressed = model.to_openvino(
                Path(export_root) / kind, compression_type=CompressionType(kind), datamodule=datamodule
            )
            runtimes[f"OpenVINO {kind}, CPU default precision"] = openvino_predict(
                OpenVINOInferencer(compressed, device="CPU")
            )
        rows, reference = [], None
        for name, predict in runtimes.items():
            row = {"runtime": name, "s/image (batch 1)": seconds_per_call(predict, singles)}
            row["images/s (batch 8)"] = len(eights[0]) / seconds_per_call(predict, eights)
            if args.ckpt:
                scores, maps = (np.concatenate(parts) for parts in zip(*map(predict, eights), strict=True))
                row |= metrics(scores, maps, labels[: len(scores)], masks[: len(scores)])
                reference = maps if reference is None else reference
                row["map diff vs torch: mean"] = float(np.abs(maps - reference).mean())
                row["max"] = float(np.abs(maps - reference).max())
            rows.append(row)

    bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "unknown"
    print(
        f"\n{label}: {len(images)} {args.category} test images, {torch.get_num_threads()} torch threads, "
        f"CPU bf16: {bf16}"
    )
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(value if isinstance(value, str) else f"{value:.3f}" for value in row.values()) + " |")


if __name__ == "__main__":
    main()
