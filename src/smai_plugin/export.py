"""SMAI's export rules on top of anomalib's, and the CPU fact its deployment depends on.

anomalib's ``ExportMixin`` exports any model to Torch, ONNX and OpenVINO. SMAI adds four
rules: a calibrating model exports only with fitted, current normal statistics (they are
constants of the graph); ONNX uses opset 18, the one torch's exporter writes (anomalib asks for
14, which goes through ONNX's version converter); the ONNX graph is written without
onnxscript's optimiser (OpenVINO and ONNX Runtime optimise it when they load it); and
``int8_ptq`` is refused, because quantising the activations breaks the scoring. One option:
``reconstruction=True`` (``onnx_kwargs={"reconstruction": True}`` through anomalib's export) adds
the reconstruction as a fifth output of the graph.

OpenVINO's CPU plugin infers in bfloat16 by default on CPUs that have it
(:func:`cpu_has_bf16`), which moves SMAI's scores by up to about 0.1 (normalised): deploy with
``INFERENCE_PRECISION_HINT: f32`` for torch's results (docs/deploy.md, "Precision").

Example:
    >>> isinstance(cpu_has_bf16(), bool)
    True

"""

from pathlib import Path

from anomalib.deploy import CompressionType
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .errors import SmaiInputError

__all__ = ["ONNX_OPSET", "SmaiExportMixin", "cpu_has_bf16"]

ONNX_OPSET = 18


def cpu_has_bf16() -> bool:
    """Whether this CPU has AVX-512 bfloat16 instructions (OpenVINO's CPU plugin then defaults to bf16).

    ``False`` where ``/proc/cpuinfo`` does not exist (not Linux).
    """
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "avx512_bf16" in cpuinfo.read_text()


class SmaiExportMixin:
    """Export methods of :class:`~smai_plugin.Smai`, checked before anomalib's ``ExportMixin`` runs.

    Mixed in before ``AnomalibModule``; needs the model's ``needs_calibration`` and ``_trained_on``.
    """

    needs_calibration: bool
    _trained_on: str | None
    # True only while an export adds the reconstruction to the graph's outputs; a class default,
    # so models pickled by earlier versions (Torch exports) have it too.
    _export_reconstruction: bool = False

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        reconstruction: bool = False,
        **kwargs,
    ) -> Path:
        """Export to ONNX with opset 18, torch's exporter's own (no version conversion of the graph).

        The graph holds the whole pipeline: resize, superpixels, every inpainting pass, the
        scoring and anomalib's post-processing. With ``input_size=None`` the input's height and
        width stay dynamic (the pre-processor resizes to the model's size). ``optimize``
        defaults to ``False``: onnxscript's optimiser took a third to half of the export's time, and
        OpenVINO and ONNX Runtime ran the unoptimised graph as fast (docs/deploy.md).
        ``reconstruction=True`` adds the output ``reconstruction`` (``(B, 3, H, W)`` in ``[0, 1]``,
        at the model's image size) after anomalib's four; off by default, so the graph is what
        anomalib's inferencers read. Other arguments go to
        :meth:`anomalib.models.AnomalibModule.to_onnx`.
        """
        self._check_calibrated()
        if reconstruction and self.model.anomaly_map_generator is None:
            msg = "This SMAI model scores with the memory alone (no inpainting): it has no reconstruction to export."
            raise SmaiInputError(msg)
        kwargs.setdefault("opset_version", ONNX_OPSET)
        kwargs.setdefault("optimize", False)
        self._export_reconstruction = reconstruction  # read by Smai.forward while the graph is traced
        try:
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)
        finally:
            self._export_reconstruction = False

    def to_openvino(
        self,
        *args,
        compression_type: CompressionType | str | None = None,
        reconstruction: bool = False,
        **kwargs,
    ) -> Path:
        """Export to OpenVINO (:meth:`anomalib.models.AnomalibModule.to_openvino`).

        ``fp16`` and ``int8`` (weights only) keep bottle's metrics within 0.003 of float32;
        ``int8_ptq`` is refused: quantising the activations breaks the scoring (measured with
        ``benchmarks/deploy_latency.py``). ``reconstruction=True``: see :meth:`to_onnx`.

        Raises:
            ValueError: If ``compression_type`` is ``int8_ptq``.

        """
        if compression_type is not None and CompressionType(compression_type) == CompressionType.INT8_PTQ:
            msg = (
                "SMAI does not survive int8_ptq: quantising its activations (superpixels, score maps, calibration) "
                "dropped bottle's image AUROC from 0.998 to 0.569 and PRO from 0.852 to 0.805. Use "
                "--compression_type int8 (weights only; image AUROC 0.995) or fp16 (0.996) instead."
            )
            raise SmaiInputError(msg)
        if reconstruction:
            kwargs["onnx_kwargs"] = {**(kwargs.get("onnx_kwargs") or {}), "reconstruction": True}
        return super().to_openvino(*args, compression_type=compression_type, **kwargs)

    def to_torch(self, *args, **kwargs) -> Path:
        """Export to Torch (:meth:`anomalib.models.AnomalibModule.to_torch`), once calibrated."""
        self._check_calibrated()
        return super().to_torch(*args, **kwargs)

    def _check_calibrated(self) -> None:
        """Refuse to export a calibrating model whose statistics are missing or stale; warn for an untrained one."""
        if self._trained_on is None:
            rank_zero_warn(
                "Exporting a SMAI model that was never trained: PEN-Net's weights are random, so its scores mean "
                "nothing. Export after fitting, or from a trained checkpoint (--ckpt_path)."
            )
        if self.needs_calibration:
            msg = (
                "SMAI's normal statistics are missing or older than its weights, so the export would score "
                "without them: export after fitting (validation calibrates), or from a checkpoint saved at the end "
                "of training."
            )
            raise SmaiInputError(msg)
