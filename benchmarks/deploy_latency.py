"""SMAI deployed: PyTorch eager against the OpenVINO export in float32 and in the CPU's default precision.

Exports SMAI with anomalib's OpenVINO export and runs every test image of a category through the
torch model (``Smai.forward``: pre-processing, scoring, post-processing) and through anomalib's
``OpenVINOInferencer`` with ``INFERENCE_PRECISION_HINT: f32`` (the parity setting) and as an
OpenVINO user calls it (``OpenVINOInferencer(path, device="CPU")``: bf16 on CPUs that have it), and
both also for an export whose batch is fixed to one image (``onnx_kwargs`` with only height
and width dynamic; run one image at a time, and 8 images at a time as parallel requests with
OpenVINO's ``THROUGHPUT`` hint). Per runtime it prints seconds per image at batch 1 (the median
call over three passes through the test images, after five warm-up calls: a dynamic-shape OpenVINO
model reaches its speed after a few calls; every runtime is timed in two rounds, after one another,
and its better round counts, so that a busy neighbour's burst on a shared machine does not),
images per second at batch 8, the peak resident memory of the process that ran it, and, with
``--ckpt`` (a trained checkpoint), image AUROC, pixel AUROC and PRO of the deployed outputs and the
mean and largest difference of their anomaly maps from torch's (on the test images in whole batches
of 8: 80 of bottle's 83). ``--compression`` adds exports compressed by
anomalib's export (``fp16`` weights, ``int8`` weights; ``int8_ptq`` is refused by
``Smai.to_openvino``, with the numbers that made it so). ``--patchcore`` fits anomalib's PatchCore
(the benchmark's settings: offline EfficientNet-Lite0, 1% coreset) on the same training images and
adds its PyTorch row, on the same test images in the same run. Without ``--ckpt`` the model is
untrained and calibrated on a few training images (weights do not change the cost), and only speed
is printed.

Every runtime runs in a fresh process, so its peak memory (the process's resident set at its
peak while the runtime is built, warmed up and run: Python, torch, anomalib and the runtime
included) is its own.

Examples::

    python benchmarks/deploy_latency.py --root ../shared/data
        --ckpt results/Smai/MVTecAD/bottle/latest/weights/lightning/model.ckpt
    python benchmarks/deploy_latency.py --root ../shared/data --ckpt <model.ckpt> --compression fp16 int8 --patchcore
    python benchmarks/deploy_latency.py --root ../shared/data --config configs/smai_cpu.yaml --images 8  # speed only
    python benchmarks/deploy_latency.py --root ../shared/data --config configs/smai.yaml --scoring grouped

(the first on one line).
"""

import math
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import ImageBatch, MVTecAD
from anomalib.data.utils import read_image
from anomalib.deploy import CompressionType, OpenVINOInferencer
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC
from anomalib.models import Patchcore
from common import PeakMemory, format_cell, markdown_table, model_init_args, script_parser
from torch.nn import functional as F  # noqa: N812

from smai_plugin import Smai
from smai_plugin.backbone import OFFLINE_BACKBONE
from smai_plugin.export import cpu_has_bf16

# Only the input's height and width stay dynamic: an export for one image at a time (docs/deploy.md).
BATCH_OF_ONE = {"input": {2: "height", 3: "width"}}
F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # OpenVINO's parity setting
WARM_UP_CALLS = 5  # OpenVINO plans a dynamic-shape model's memory over its first calls
PASSES = 3
# Every runtime is timed in two rounds, one after another, and keeps its better round: on a shared
# machine a busy neighbour slowed single runtimes by half for a minute at a time.
ROUNDS = 2

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


def seconds_per_call(predict: Predict, batches: list[np.ndarray], passes: int = PASSES) -> float:
    """The median time of one call, over ``passes`` passes through ``batches``."""
    times = []
    for _ in range(passes):
        for batch in batches:
            start = time.perf_counter()
            predict(batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def streamed_images_per_second(xml: str, config: dict | None, batches: list[np.ndarray]) -> float:
    """Images per second of an export for one image at a time, fed each batch as parallel requests.

    OpenVINO's way to throughput: the ``THROUGHPUT`` hint compiles the model for several
    streams (one per core here) and an ``AsyncInferQueue`` keeps each stream busy with an image.
    """
    import openvino

    compiled = openvino.Core().compile_model(xml, "CPU", {**(config or {}), "PERFORMANCE_HINT": "THROUGHPUT"})
    queue = openvino.AsyncInferQueue(compiled)

    def run(batch: np.ndarray) -> None:
        for image in batch:
            queue.start_async({0: image[None]})
        queue.wait_all()

    run(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    return sum(map(len, batches)) / (time.perf_counter() - start)


def run_runtime(
    runtime: tuple[str, str, dict | None], singles: list[np.ndarray], eights: list[np.ndarray], outputs: bool
) -> dict:
    """Build one runtime in this (fresh) process and time it; return timings, peak memory and, if asked, outputs.

    ``runtime`` is ``("torch", <pickled model file>, None)``, ``("openvino", <xml>, <config>)``
    or ``("openvino-batch-1", <xml>, <config>)`` (an export whose batch is fixed to 1: its outputs
    are computed one image at a time, and its batch-8 throughput is that of 8 parallel requests,
    :func:`streamed_images_per_second`, after the peak memory is taken).
    """
    kind, source, config = runtime
    with PeakMemory() as memory:
        if kind == "torch":
            predict = torch_predict(torch.load(source, weights_only=False).eval())
        else:
            predict = openvino_predict(OpenVINOInferencer(source, device="CPU", config=config))
        for _ in range(WARM_UP_CALLS):  # kernels are built on the first call, memory planned over a few
            predict(singles[0])
        result: dict[str, Any] = {"s/image (batch 1)": seconds_per_call(predict, singles)}
        if kind != "openvino-batch-1":
            result["images/s (batch 8)"] = len(eights[0]) / seconds_per_call(predict, eights)
        if outputs and kind == "openvino-batch-1":
            per_image = [[predict(image[None]) for image in batch] for batch in eights]
            result["outputs"] = [tuple(map(np.concatenate, zip(*batch, strict=True))) for batch in per_image]
        elif outputs:
            result["outputs"] = [predict(batch) for batch in eights]
    result["peak MiB"] = memory.peak_rss_mib
    if kind == "openvino-batch-1":
        result["images/s (batch 8)"] = streamed_images_per_second(source, config, eights)
    return result


def run_in_fresh_process(runtime: tuple[str, str, dict | None], singles: list, eights: list, outputs: bool) -> dict:
    """:func:`run_runtime` in a new process, so that its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_runtime, runtime, singles, eights, outputs).result()


def fastest(results: Iterable[dict]) -> dict:
    """One runtime's rounds combined: its best time and throughput, its largest peak memory, the first's outputs."""
    results = list(results)
    return {
        **results[0],
        "s/image (batch 1)": min(result["s/image (batch 1)"] for result in results),
        "images/s (batch 8)": max(result["images/s (batch 8)"] for result in results),
        "peak MiB": max(result["peak MiB"] for result in results),
    }


def fit_patchcore(datamodule: MVTecAD, work: Path) -> Patchcore:
    """anomalib's PatchCore with the benchmark's settings (configs/benchmark_cpu.yaml), fitted on the training split."""
    model = Patchcore(
        backbone=OFFLINE_BACKBONE, layers=["blocks.2", "blocks.4"], coreset_sampling_ratio=0.01, num_neighbors=9
    )
    engine = Engine(default_root_dir=work, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    return model.eval()


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
    if labels.unique().numel() < 2:  # AUROC needs good and defective images; anomalib's reads 0 without them
        values["image AUROC"] = math.nan
    return values


def main() -> None:
    parser = script_parser(__doc__, config_help="without --ckpt")
    parser.add_argument("--ckpt", type=Path, help="trained checkpoint: adds accuracy on the test split")
    parser.add_argument("--images", type=int, help="test images used (default: all with --ckpt, else 8)")
    parser.add_argument("--scoring", help="override the config's scoring (without --ckpt)")
    parser.add_argument("--patchcore", action="store_true", help="add anomalib's PatchCore, fitted here")
    parser.add_argument("--inpainted-superpixels", type=int, help="override SMAI's inpainted_superpixels")
    parser.add_argument(
        "--compression",
        nargs="*",
        default=[],
        choices=[kind.value for kind in CompressionType],
        help="also export with anomalib's compression (NNCF: pip install 'smai-plugin[openvino]')",
    )
    args = parser.parse_args()

    overrides = {} if args.inpainted_superpixels is None else {"inpainted_superpixels": args.inpainted_superpixels}
    if args.ckpt:
        model = Smai.load_from_checkpoint(args.ckpt, map_location="cpu", **overrides).eval()
        label = f"{args.ckpt} {overrides}"
    else:
        init_args = model_init_args(args.config, **({"scoring": args.scoring} if args.scoring else {}), **overrides)
        model = Smai(**init_args).eval()
        label = f"{args.config} (untrained), {init_args.get('scoring')} scoring {overrides}"
    datamodule = MVTecAD(root=args.root, category=args.category, eval_batch_size=8, num_workers=0)
    datamodule.setup()
    if model.needs_calibration:  # an export needs statistics; here from training images
        train = sorted((args.root / args.category / "train").rglob("*.png"))[: None if args.ckpt else 4]
        batches = torch.stack([read_image(path, as_tensor=True) for path in train]).split(8)
        model.model.calibrate([model.pre_processor(batch) for batch in batches])
    test = list(datamodule.test_dataloader())
    images = torch.cat([batch.image for batch in test])[: args.images or (None if args.ckpt else 8)]
    labels = torch.cat([batch.gt_label for batch in test])[: len(images)]
    masks = torch.cat([batch.gt_mask for batch in test])[: len(images)]
    singles = [image[None].numpy() for image in images]
    eights = [batch.numpy() for batch in images.split(8) if len(batch) == 8] or [images.numpy()]

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        torch.save(model, work / "smai.pt")
        xml = model.to_openvino(work / "smai")
        runtimes: dict[str, tuple[str, str, dict | None]] = {
            "SMAI PyTorch eager": ("torch", str(work / "smai.pt"), None),
            "SMAI OpenVINO f32 (parity)": ("openvino", str(xml), F32),
            "SMAI OpenVINO CPU default precision": ("openvino", str(xml), None),
        }
        batch_one = model.to_openvino(work / "smai_batch_1", onnx_kwargs={"dynamic_axes": BATCH_OF_ONE})
        runtimes["SMAI OpenVINO batch fixed to 1, f32"] = ("openvino-batch-1", str(batch_one), F32)
        runtimes["SMAI OpenVINO batch fixed to 1, CPU default precision"] = ("openvino-batch-1", str(batch_one), None)
        for kind in args.compression:  # int8_ptq/int8_acq calibrate on the datamodule (anomalib's choice of split)
            compressed = model.to_openvino(work / kind, compression_type=CompressionType(kind), datamodule=datamodule)
            runtimes[f"SMAI OpenVINO {kind}, CPU default precision"] = ("openvino", str(compressed), None)
        if args.patchcore:
            patchcore = fit_patchcore(datamodule, work / "patchcore_run")
            torch.save(patchcore, work / "patchcore.pt")
            # PyTorch only: anomalib 2.7 exports PatchCore with a fixed batch of 2, which batch 1 cannot feed.
            runtimes["PatchCore PyTorch eager"] = ("torch", str(work / "patchcore.pt"), None)
        # Only the first round computes the outputs for the metrics: the rounds differ in time only.
        rounds = [
            {name: run_in_fresh_process(runtime, singles, eights, index == 0) for name, runtime in runtimes.items()}
            for index in range(ROUNDS)
        ]
        rows, reference = [], None
        for name in runtimes:
            result = fastest(run[name] for run in rounds)
            outputs = result.pop("outputs")
            row = {"runtime": name, **result}
            if args.ckpt:
                scores, maps = (np.concatenate(parts) for parts in zip(*outputs, strict=True))
                row |= metrics(scores, maps, labels[: len(scores)], masks[: len(scores)])
                if name.startswith("SMAI"):
                    reference = maps if reference is None else reference
                    row["map diff vs torch: mean"] = float(np.abs(maps - reference).mean())
                    row["max"] = float(np.abs(maps - reference).max())
            rows.append(row)

    print(
        f"\n{label}: {len(images)} {args.category} test images, {torch.get_num_threads()} torch threads, "
        f"CPU bf16: {cpu_has_bf16()}"
    )
    columns = list(dict.fromkeys(key for row in rows for key in row))  # PatchCore rows have no map difference
    print(markdown_table(columns, ([format_cell(row.get(column, "")) for column in columns] for row in rows)))


if __name__ == "__main__":
    main()
