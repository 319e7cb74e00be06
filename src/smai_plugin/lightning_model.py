"""SMAI: Superpixel Masking And Inpainting for self-supervised anomaly detection.

Paper: Li et al., "Superpixel Masking and Inpainting for Self-Supervised Anomaly Detection",
BMVC 2020.

SMAI trains an inpainting network (PEN-Net) on normal images only: each step masks ``n_masked``
random SLIC superpixels of every image and teaches the network to restore them. At test time
each superpixel is masked and inpainted in turn; a defect cannot be restored from normal
context, so the inpainting differs from the original there. The difference (``1 - SSIM`` or
``L2`` as in the paper; by default MSGMS of the reconstruction assembled from the inpainted
superpixels) forms the anomaly map, by default beside the distance of the image's pretrained
features to a memory of normal features, and the image score is calibrated against the maps of
the normal training images after training.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from smai_plugin import Smai
    >>> model = Smai(max_steps=500)  # doctest: +SKIP
    >>> engine = Engine()  # doctest: +SKIP
    >>> engine.fit(model=model, datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
    >>> engine.test(model=model, datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP

From the command line, after ``pip install`` (no import needed)::

    anomalib train --model Smai --data MVTecAD --model.max_steps 500

"""

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Compose, Normalize, Resize

from ._config import check_int
from .anomaly_map import Comparison
from .batch import with_reconstruction
from .calibration import Calibration, SmaiCalibrationMixin
from .checkpoint import CheckedCheckpointIO, SmaiCheckpointMixin
from .data_checks import SmaiDataChecksMixin
from .errors import SmaiInputError
from .export import SmaiExportMixin
from .loss import SmaiLoss, discriminator_hinge_loss
from .pennet import PenNetDiscriminator, composite, to_signed
from .torch_model import SIZE_MULTIPLE, ReconstructedBatch, ScoringMode, SmaiModel
from .visualizer import SmaiVisualizer

__all__ = ["Smai"]

DEFAULT_IMAGE_SIZE = (256, 256)  # the paper's


def _no_closure() -> None:
    """Closure of an optimiser step whose gradients are already computed."""


def _square(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """Read an int size as a square, as anomalib's models read an int ``image_size``."""
    if isinstance(size, int) and not isinstance(size, bool):
        return (size, size)
    return size


class Smai(SmaiDataChecksMixin, SmaiCalibrationMixin, SmaiCheckpointMixin, SmaiExportMixin, AnomalibModule):
    """SMAI as an anomalib model.

    Its data checks, calibration after training, checkpoint contents and export rules come
    from the mixins of :mod:`smai_plugin.data_checks`, :mod:`smai_plugin.calibration`,
    :mod:`smai_plugin.checkpoint` and :mod:`smai_plugin.export`.

    Args:
        n_superpixels (int): Superpixels per image, the paper's m. Defaults to ``77``.
        n_masked (int): Superpixels masked per training image, the paper's k. Defaults to ``10``.
        scoring (ScoringMode | str): Inference schedule: ``"windowed"`` (one pass per superpixel
            on a ``window_size`` crop around it; training then also learns on such crops),
            ``"leave_one_out"`` (the paper's, one whole-image pass per superpixel) or
            ``"grouped"`` (non-touching superpixels share a whole-image pass, 9 passes). Train
            and score with the same family: windowed, or one of the whole-image two.
            Defaults to ``"windowed"`` (over 50x faster than leave-one-out at 256x256).
        score_measure (str | Sequence[str]): How inpainting and
            original are compared: ``"ssim"`` (paper eq. 2), ``"l2"`` (eq. 3), ``"msgms"``
            (multi-scale gradient magnitude similarity), ``"features"`` (cosine distance of
            pretrained EfficientNet-Lite0 features), ``"memory"`` (Euclidean distance of each
            patch of the original to the nearest normal patch of the training images, as
            PatchCore scores; see :mod:`smai_plugin.memory`), or a list. With the memory, the
            map is the memory's plus what the other measures show beyond their normal level
            (:meth:`SmaiModel.combine`); without, their mean after calibration. Defaults to
            ``["msgms", "memory"]``: the inpainting's MSGMS residual beside the memory
            (docs/quality.md).
        comparison (Comparison | str): ``"reconstruction"`` (assemble the inpainted
            superpixels into one image and compare it with the original) or ``"per_pass"``
            (the paper's: each pass's inpainting against the original inside its hole).
            Defaults to ``"reconstruction"``.
        calibration (Calibration | str): Use per-pixel mean and spread of the maps of normal
            training images, fitted after training (see :mod:`smai_plugin.calibration`):
            ``"score"`` standardises the maps for the image score and divides the anomaly map
            by the normal mean residual; ``"map"`` standardises the anomaly map too; ``"none"``
            keeps raw maps (one measure only). Defaults to ``"score"``.
        top_k_fraction (float): Image score: mean of this share of the highest pixels of the
            map it is taken from; ``0`` takes the maximum. Defaults to ``0.01``.
        sigma (float): Standard deviation, in pixels of the scored image, of the Gaussian that
            smooths each difference map; ``0`` turns smoothing off. Defaults to ``4.0``.
        image_size (int | tuple[int, int] | None): Size the default pre-processor resizes to
            (an int: a square); height and width must be multiples of 64. Defaults to
            ``(256, 256)``, the paper's.
        base_channels (int): PEN-Net generator width. Defaults to ``32`` (PEN-Net's).
        discriminator_channels (int): Discriminator width. Defaults to ``64`` (PEN-Net's).
        compactness (float): SLIC compactness. Defaults to ``10.0``.
        slic_iterations (int): SLIC iterations. Defaults to ``10``.
        max_steps (int | None): Training iterations (one generator and one discriminator update
            each); Lightning's ``global_step`` counts the same iterations. ``None`` leaves the
            budget to the trainer (``max_steps`` / ``max_epochs``, as for anomalib's built-in
            models). Defaults to ``None``; the paper trains 50 000 (``configs/smai.yaml``).
        learning_rate (float): Adam learning rate of both networks. Defaults to ``1e-4``.
        hole_weight (float): Hole L1 loss weight. Defaults to ``6.0``.
        valid_weight (float): Valid-region L1 loss weight. Defaults to ``1.0``.
        pyramid_weight (float): Pyramid L1 loss weight. Defaults to ``0.5``.
        adversarial_weight (float): Adversarial loss weight. Defaults to ``0.1``.
        ssim_weight (float): SMAI's ``1 - SSIM`` loss weight. Defaults to ``1.0``.
        passes_per_batch (int): Most passes per image in one generator call when scoring (a
            call inpaints ``eval_batch_size * passes_per_batch`` images); bounds memory.
            Defaults to ``16``.
        local_attention (bool): PEN-Net's attention only from positions near the hole, in
            training and inference (see :mod:`smai_plugin.attention`). Defaults to ``False``.
        attention_budget (float): With local attention, share of positions whose attention is
            computed at inference, in ``(0, 1]``. Defaults to ``1.0``.
        window_size (int): With ``scoring="windowed"``, side of the crop around each superpixel
            that is inpainted, in training and scoring; a multiple of 64. Defaults to ``64``.
        memory_size (int): With the ``memory`` measure, most normal patch vectors the memory
            keeps (see :mod:`smai_plugin.memory`). Defaults to ``4096``.
        memory_sampling (str): How the memory chooses them from the training images' patches:
            ``"coreset"`` (greedy k-center, as PatchCore: rare normal patches stay covered) or
            ``"random"`` (a seeded sample). Defaults to ``"coreset"``.
        memory_neighbourhood (int | Sequence[int]): Side of the window the memory's features are
            averaged over (odd, ``1``: none); with several, each patch is described at each and the
            descriptions joined. Defaults to ``(3, 1)``: PatchCore's locally aware patch beside the
            patch's own features (docs/quality.md).
        memory_dilation (int): Side of the window of positions whose largest memory distance each
            position takes, so that a defect's map covers its extent (odd, ``1``: none). Defaults to ``3``.
        memory_whitening (bool | None): ``True`` measures the memory's distances in the space
            whitened by the covariance of the normal patches (all positions together), so that
            small changes normal patches never show count as much as their large, harmless
            variation (it helps on textures); ``False``: plain Euclidean distances of the
            features (better on aligned objects). ``None`` chooses from the training images:
            whitened when less than 65% of the patches' feature variance lies between positions
            (see :mod:`smai_plugin.memory`). Defaults to ``None``.
        image_score_measure (str | Sequence[str] | None): The measure(s) of ``score_measure``
            whose calibrated maps give the image score; every measure shapes the anomaly map.
            ``None`` takes ``"memory"`` where it is measured (it ranks images best on every
            category measured, docs/quality.md), else all. Defaults to ``None``.
        inpaint_size (int | tuple[int, int] | None): Size the images are resized to (from
            ``image_size``) for the superpixels, PEN-Net and the inpainting's measures, whose maps
            are resized back; the memory sees the images at ``image_size``. Multiples of 64;
            ``None`` inpaints at ``image_size``. Defaults to ``None``.
        inpainted_superpixels (int | None): When scoring, inpaint only this many superpixels per
            image: those the memory finds farthest from normal (highest mean distance); the
            inpainting's measures read as their normal mean elsewhere, so the map there is the
            memory's. Needs the ``memory`` measure beside an inpainting one and ``windowed`` or
            ``leave_one_out`` scoring; the calibration inpaints every superpixel. ``None``
            inpaints all. Defaults to ``None``.
        pre_processor (PreProcessor | bool): Pre-processor, or ``True`` for the default resize
            (no normalisation: SMAI works on ``[0, 1]`` images). Defaults to ``True``.
        post_processor (PostProcessor | bool): Post-processor or flag. Defaults to ``True``.
        evaluator (Evaluator | bool): Evaluator or flag; the default is anomalib's (image and
            pixel AUROC and F1), so SMAI's results line up with the built-in models' (also in
            ``anomalib benchmark``). The configs in ``configs/`` add PRO (AUPRO up to 30% FPR).
            Defaults to ``True``.
        visualizer (Visualizer | bool): Visualizer or flag; ``True`` is a
            :class:`~smai_plugin.visualizer.SmaiVisualizer` (image | reconstruction | ground
            truth | map | mask; ``SmaiVisualizer(reconstruction=False)`` leaves the
            reconstruction out). Defaults to ``True``.

    Example:
        >>> model = Smai(n_superpixels=77, n_masked=10, score_measure="l2")  # doctest: +SKIP
        >>> model.model  # the torch model, as in every anomalib model  # doctest: +SKIP

    """

    def __init__(
        self,
        n_superpixels: int = 77,
        n_masked: int = 10,
        scoring: ScoringMode | str = ScoringMode.WINDOWED,
        score_measure: str | Sequence[str] = ("msgms", "memory"),
        comparison: Comparison | str = Comparison.RECONSTRUCTION,
        calibration: Calibration | str = Calibration.SCORE,
        top_k_fraction: float = 0.01,
        sigma: float = 4.0,
        image_size: int | tuple[int, int] | None = None,
        base_channels: int = 32,
        discriminator_channels: int = 64,
        compactness: float = 10.0,
        slic_iterations: int = 10,
        max_steps: int | None = None,
        learning_rate: float = 1e-4,
        hole_weight: float = 6.0,
        valid_weight: float = 1.0,
        pyramid_weight: float = 0.5,
        adversarial_weight: float = 0.1,
        ssim_weight: float = 1.0,
        passes_per_batch: int = 16,
        local_attention: bool = False,
        attention_budget: float = 1.0,
        window_size: int = 64,
        memory_size: int = 4096,
        memory_sampling: str = "coreset",
        memory_neighbourhood: int | Sequence[int] = (3, 1),
        memory_dilation: int = 3,
        memory_whitening: bool | None = None,
        image_score_measure: str | Sequence[str] | None = None,
        inpaint_size: int | tuple[int, int] | None = None,
        inpainted_superpixels: int | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        # The torch modules check the values they own, first; here those of this module and the
        # checks that span several parameters.
        model = SmaiModel(
            n_superpixels=n_superpixels,
            scoring=scoring,
            score_measure=score_measure,
            comparison=comparison,
            calibration=calibration,
            top_k_fraction=top_k_fraction,
            sigma=sigma,
            base_channels=base_channels,
            compactness=compactness,
            slic_iterations=slic_iterations,
            passes_per_batch=passes_per_batch,
            local_attention=local_attention,
            attention_budget=attention_budget,
            window_size=window_size,
            memory_size=memory_size,
            memory_sampling=memory_sampling,
            memory_neighbourhood=memory_neighbourhood,
            memory_dilation=memory_dilation,
            memory_whitening=memory_whitening,
            image_score_measure=image_score_measure,
            inpaint_size=_square(inpaint_size),
            inpainted_superpixels=inpainted_superpixels,
        )
        discriminator = PenNetDiscriminator(discriminator_channels)
        loss = SmaiLoss(hole_weight, valid_weight, pyramid_weight, adversarial_weight, ssim_weight)
        if check_int(n_masked, "n_masked") > n_superpixels:
            msg = f"n_masked must be between 1 and n_superpixels ({n_superpixels}), got {n_masked}."
            raise SmaiInputError(msg)
        if max_steps is not None:
            check_int(max_steps, "max_steps")
        if learning_rate <= 0:
            msg = f"learning_rate must be positive, got {learning_rate}."
            raise SmaiInputError(msg)
        image_size = _square(image_size)
        # The size the default pre-processor resizes to; a custom one is checked on the first batch.
        size = (image_size or DEFAULT_IMAGE_SIZE) if pre_processor is True else None
        size = model.inpaint_size or size  # the size PEN-Net and the superpixels work at
        self._check_image_size(model, size)
        if size is not None and model.scoring == ScoringMode.WINDOWED and window_size > min(size):
            rank_zero_warn(
                f"window_size {window_size} is larger than the {size} images: every windowed pass inpaints "
                "the whole image, which costs as much as leave-one-out scoring. Lower window_size."
            )
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = model
        self.discriminator = discriminator
        self.loss = loss
        self.n_masked = n_masked
        self.max_steps = max_steps
        self.learning_rate = learning_rate
        # A GAN: the generator and the discriminator step in turn.
        self.automatic_optimization = False
        # Training changes the inpainter, so the normal statistics must be fitted again.
        self._calibration_stale = False
        # What the generator learnt on (crops or whole images), saved with checkpoints.
        self._trained_on: str | None = None

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize only: SMAI works on RGB images in ``[0, 1]``.

        Args:
            image_size (tuple[int, int] | None): Target size. Defaults to ``(256, 256)``.

        Returns:
            PreProcessor: Pre-processor with a resize transform.

        """
        return PreProcessor(transform=Compose([Resize(image_size or DEFAULT_IMAGE_SIZE, antialias=True)]))

    @classmethod
    def configure_visualizer(cls) -> SmaiVisualizer:
        """Draw pictures with anomalib's image visualizer and SMAI's reconstruction beside each image."""
        return SmaiVisualizer()

    @staticmethod
    def _check_image_size(model: SmaiModel, image_size: tuple[int, int] | None) -> None:
        """Refuse a size PEN-Net or the superpixels cannot take (``image_size``, or ``inpaint_size``), early."""
        if image_size is None:  # a custom pre-processor: SmaiModel checks each batch
            return
        if len(image_size) != 2:
            msg = f"image_size must be (height, width), each a positive multiple of {SIZE_MULTIPLE}, got {image_size}."
            raise SmaiInputError(msg)
        model.check_size(*image_size)
        model.masker.check_size(*image_size)

    def setup(self, stage: str) -> None:
        """Check checkpoints before the trainer reads them; let DDP find unused parameters when fitting.

        Lightning reads ``ckpt_path`` after this hook, and torch's errors do not name a damaged
        file (see :mod:`smai_plugin.checkpoint`). The discriminator and the generator step
        after separate backward passes, and the discriminator's does not reach the generator's
        parameters, so plain DDP would stop with "parameters that were not used in producing the loss".
        """
        strategy = self.trainer.strategy
        if not isinstance(strategy.checkpoint_io, CheckedCheckpointIO):
            strategy.checkpoint_io = CheckedCheckpointIO(strategy.checkpoint_io)
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if stage == "fit" and isinstance(strategy, DDPStrategy) and isinstance(ddp_kwargs, dict):
            if not ddp_kwargs.get("find_unused_parameters"):
                rank_zero_info("SMAI: enabling DDP's find_unused_parameters (separate generator/discriminator steps).")
            ddp_kwargs["find_unused_parameters"] = True

    def on_fit_start(self) -> None:
        """Before the first iteration: check the data files and that there are images to calibrate on."""
        super().on_fit_start()
        self.check_calibration_images()

    def on_validation_start(self) -> None:
        """Calibrate before scoring (see :meth:`calibrate`)."""
        self.calibrate()

    def on_validation_end(self) -> None:
        """After the validation that ends training: complete the checkpoints saved just before it."""
        if self.trainer.state.fn in {TrainerFn.FITTING, TrainerFn.VALIDATING}:
            self.save_completed_checkpoints()

    def on_fit_end(self) -> None:
        """Validate (and so calibrate) a fit that resumed from a checkpoint saved at the end of its budget.

        Lightning skips the whole training loop, with the validation that follows it, when the
        checkpoint it resumes from has already reached ``max_steps``: a run killed while it
        calibrated after its last iteration. The validation runs here instead, and the checkpoint
        resumed from is written again with its results (:meth:`save_completed_checkpoints`).
        """
        trainer = self.trainer
        finished = not trainer.interrupted and trainer.global_step >= self._last_iteration()
        if finished and self.needs_calibration and trainer.datamodule is not None:
            rank_zero_info("SMAI: training had reached its budget; validating (and calibrating) as it ends.")
            trainer.validate(self, datamodule=trainer.datamodule, verbose=False)

    def on_test_start(self) -> None:
        """Check the test files, calibrate if needed, then score."""
        self.check_scored_files("test")
        self.calibrate()

    def on_predict_start(self) -> None:
        """Check the files to predict, calibrate if needed, then score."""
        self.check_scored_files("predict")
        self.calibrate()

    def on_train_start(self) -> None:
        """Validate after the last iteration; refuse a pre-processor that normalises.

        Scoring is costly (many inpaintings per image), so validation, which calibrates and
        fits the post-processor's thresholds, runs once, after the last iteration of the
        budget (the model's ``max_steps`` or the trainer's ``max_steps`` / ``max_epochs``),
        rather than every epoch. PEN-Net needs images in ``[0, 1]``. When resuming
        (``ckpt_path``), the random state saved with the checkpoint is restored, so a resumed
        run draws the same holes whatever the seed of the new process.
        """
        self.trainer.val_check_batch = self._last_iteration()
        self.restore_random_state()
        if self.pre_processor and extract_transforms_by_type(self.pre_processor.transform, Normalize):
            msg = "SMAI's pre-processor must not normalise images (SMAI works on [0, 1] RGB): remove Normalize."
            raise SmaiInputError(msg)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """Adam for the generator and for the discriminator, betas (0.5, 0.999) as in PEN-Net."""
        generator = torch.optim.Adam(self.model.generator.parameters(), lr=self.learning_rate, betas=(0.5, 0.999))
        discriminator = torch.optim.Adam(self.discriminator.parameters(), lr=self.learning_rate, betas=(0.5, 0.999))
        return generator, discriminator

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Mask random superpixels, update the discriminator, then the generator.

        Args:
            batch (Batch): Batch of normal images.
            args: Unused.
            kwargs: Unused.

        Returns:
            STEP_OUTPUT: The generator's loss terms.

        """
        del args, kwargs
        self.check_finite(batch)
        self._calibration_stale = self.model.calibration != Calibration.NONE
        self._trained_on = self.model.training_family
        with torch.no_grad():
            images, holes = self.model.training_inputs(batch.image, self.n_masked)
        output, pyramid = self.model(images, holes)
        originals = to_signed(images)
        completed = composite(originals, output, holes)
        generator_optimizer, discriminator_optimizer = self.optimizers()

        discriminator_loss = discriminator_hinge_loss(
            self.discriminator(originals), self.discriminator(completed.detach())
        )
        discriminator_optimizer.zero_grad()
        self.manual_backward(discriminator_loss)
        # One iteration updates both networks, but Lightning counts every optimiser step: the
        # discriminator steps past that counter, so global_step and max_steps count iterations.
        self.trainer.strategy.optimizer_step(discriminator_optimizer.optimizer, closure=_no_closure)

        terms = self.loss(originals, holes, output, pyramid, self.discriminator(completed))
        generator_optimizer.zero_grad()
        self.manual_backward(terms["loss"])
        generator_optimizer.step()

        self.log("train_loss", terms["loss"], prog_bar=True)
        self.log("discriminator_loss", discriminator_loss, prog_bar=True)
        self.log_dict({f"train_{name}": value for name, value in terms.items() if name != "loss"})
        return {key: value.detach() for key, value in terms.items()}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score a validation batch (the post-processor learns its thresholds from these)."""
        del args, kwargs
        return self._score(batch)

    def test_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score a test batch."""
        del args, kwargs
        return self._score(batch)

    def predict_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score a batch for prediction."""
        del args, kwargs
        return self._score(batch)

    def _score(self, batch: Batch) -> Batch:
        """Score a batch in place: anomalib's outputs and the reconstruction (see :mod:`smai_plugin.batch`)."""
        self.check_finite(batch)
        return with_reconstruction(batch).update(**self.model(batch.image, reconstruct=True)._asdict())

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> InferenceBatch | ReconstructedBatch:
        """Pre-process, score and post-process images, as every anomalib model's forward.

        While an export asks for the reconstruction (``to_onnx(..., reconstruction=True)``), the
        output is a :class:`~smai_plugin.torch_model.ReconstructedBatch`: the post-processed
        fields and the reconstruction, each an output of the exported graph.
        """
        if not self._export_reconstruction:
            return super().forward(batch, *args, **kwargs)
        images = self.pre_processor(batch) if self.pre_processor else batch
        output = self.model(images, reconstruct=True)
        predictions = InferenceBatch(*output[:-1])
        predictions = self.post_processor(predictions) if self.post_processor else predictions
        return ReconstructedBatch(*predictions, reconstruction=output.reconstruction)

    def _last_iteration(self) -> int:
        """Count the iterations after which training stops (a huge number when unbounded)."""
        trainer = self.trainer
        bounds = [trainer.max_steps] if trainer.max_steps >= 0 else []
        per_epoch = trainer.num_training_batches
        if trainer.max_epochs is not None and trainer.max_epochs >= 0 and math.isfinite(per_epoch):
            bounds.append(trainer.max_epochs * int(per_epoch))
        # Unbounded (max_time only): Lightning validates when it stops the run.
        return max(1, min(bounds)) if bounds else sys.maxsize

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """The model's iteration budget, if set, and validation once, after training.

        With ``max_steps`` set on the model, the trainer runs exactly that many iterations;
        otherwise the trainer's own ``max_steps`` / ``max_epochs`` apply, as for anomalib's
        built-in models. ``val_check_interval`` is replaced by the last iteration when
        training starts (see :meth:`on_train_start`).
        """
        budget = {} if self.max_steps is None else {"max_steps": self.max_steps, "max_epochs": -1}
        # val_check_interval: any whole number (counted in batches, across epochs); on_train_start sets it.
        validation = {"check_val_every_n_epoch": None, "val_check_interval": sys.maxsize, "num_sanity_val_steps": 0}
        return {**budget, **validation}

    @property
    def learning_type(self) -> LearningType:
        """SMAI learns from normal images only."""
        return LearningType.ONE_CLASS


def _add_to_anomalib_models(model_class: type) -> None:
    """Make ``model_class`` reachable through ``anomalib.models`` (``get_model``, ``--model Smai``).

    Called when this module is imported: by the user, or by :mod:`smai_plugin._autoload` when
    ``anomalib.models`` has loaded.
    """
    models = sys.modules["anomalib.models"]
    setattr(models, model_class.__name__, model_class)
    if model_class.__name__ not in models.__all__:
        models.__all__.append(model_class.__name__)
    models.ALLOWED_MODULES.update({"smai_plugin", model_class.__module__})


_add_to_anomalib_models(Smai)
