"""SMAI: Superpixel Masking And Inpainting for self-supervised anomaly detection.

Paper: Li et al., "Superpixel Masking and Inpainting for Self-Supervised Anomaly Detection",
BMVC 2020.

SMAI trains an inpainting network (PEN-Net) on normal images only: each step masks ``n_masked``
random SLIC superpixels of every image and teaches the network to restore them. At test time
each superpixel is masked and inpainted in turn; a defect cannot be restored from normal
context, so the inpainting differs from the original there. The difference inside each
superpixel (``1 - SSIM`` or ``L2``) forms the anomaly map.

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
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Compose, Normalize, Resize

from . import _autoload
from .anomaly_map import ScoreMeasure
from .data_checks import check_dataloaders, check_dataset
from .loss import SmaiLoss, discriminator_hinge_loss
from .pennet import PenNetDiscriminator
from .torch_model import SIZE_MULTIPLE, ScoringMode, SmaiModel

__all__ = ["Smai"]

ONNX_OPSET = 18


class Smai(AnomalibModule):
    """SMAI as an anomalib model.

    Args:
        n_superpixels (int): Superpixels per image, the paper's m. Defaults to ``77``.
        n_masked (int): Superpixels masked per training image, the paper's k. Defaults to ``10``.
        scoring (ScoringMode | str): Inference schedule: ``"windowed"`` (one pass per superpixel
            on a ``window_size`` crop around it; training then also learns on such crops),
            ``"leave_one_out"`` (the paper's, one whole-image pass per superpixel) or
            ``"grouped"`` (non-touching superpixels share a whole-image pass, 9 passes). Train
            and score with the same family: windowed, or one of the whole-image two.
            Defaults to ``"windowed"`` (over 50x faster than leave-one-out at 256x256).
        score_measure (ScoreMeasure | str): ``"ssim"`` (paper eq. 2) or ``"l2"`` (eq. 3).
            Defaults to ``"ssim"``.
        image_size (tuple[int, int] | None): Size the default pre-processor resizes to; height
            and width must be multiples of 64. Defaults to ``(256, 256)``, the paper's.
        base_channels (int): PEN-Net generator width. Defaults to ``32`` (PEN-Net's).
        discriminator_channels (int): Discriminator width. Defaults to ``64`` (PEN-Net's).
        compactness (float): SLIC compactness. Defaults to ``10.0``.
        slic_iterations (int): SLIC iterations. Defaults to ``10``.
        max_steps (int): Training iterations (one generator and one discriminator update
            each). Lightning counts both optimiser steps, so the trainer gets ``2 * max_steps``.
            Defaults to ``50000``, the paper's.
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
        pre_processor (PreProcessor | bool): Pre-processor, or ``True`` for the default resize
            (no normalisation: SMAI works on ``[0, 1]`` images). Defaults to ``True``.
        post_processor (PostProcessor | bool): Post-processor or flag. Defaults to ``True``.
        evaluator (Evaluator | bool): Evaluator or flag; the default reports image AUROC and
            F1, pixel AUROC and F1, and PRO (AUPRO up to 30% FPR). Defaults to ``True``.
        visualizer (Visualizer | bool): Visualizer or flag. Defaults to ``True``.

    Example:
        >>> model = Smai(n_superpixels=77, n_masked=10, score_measure="l2")  # doctest: +SKIP
        >>> model.model  # the torch model, as in every anomalib model  # doctest: +SKIP

    """

    def __init__(
        self,
        n_superpixels: int = 77,
        n_masked: int = 10,
        scoring: ScoringMode | str = ScoringMode.WINDOWED,
        score_measure: ScoreMeasure | str = ScoreMeasure.SSIM,
        image_size: tuple[int, int] | None = None,
        base_channels: int = 32,
        discriminator_channels: int = 64,
        compactness: float = 10.0,
        slic_iterations: int = 10,
        max_steps: int = 50_000,
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
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if not 1 <= n_masked <= n_superpixels:
            msg = f"n_masked must be between 1 and n_superpixels ({n_superpixels}), got {n_masked}."
            raise ValueError(msg)
        if max_steps < 1:
            msg = f"max_steps must be at least 1, got {max_steps}."
            raise ValueError(msg)
        if learning_rate <= 0:
            msg = f"learning_rate must be positive, got {learning_rate}."
            raise ValueError(msg)
        self._check_sizes(n_superpixels, (image_size or (256, 256)) if pre_processor is True else None)
        for name, value in (("discriminator_channels", discriminator_channels), ("slic_iterations", slic_iterations)):
            if value < 1:
                msg = f"{name} must be at least 1, got {value}."
                raise ValueError(msg)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = SmaiModel(
            n_superpixels=n_superpixels,
            scoring=scoring,
            score_measure=score_measure,
            base_channels=base_channels,
            compactness=compactness,
            slic_iterations=slic_iterations,
            passes_per_batch=passes_per_batch,
            local_attention=local_attention,
            attention_budget=attention_budget,
            window_size=window_size,
        )
        self.discriminator = PenNetDiscriminator(discriminator_channels)
        self.loss = SmaiLoss(hole_weight, valid_weight, pyramid_weight, adversarial_weight, ssim_weight)
        self.n_masked = n_masked
        self.max_steps = max_steps
        self.learning_rate = learning_rate
        # A GAN: the generator and the discriminator step in turn.
        self.automatic_optimization = False

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize only: SMAI works on RGB images in ``[0, 1]``.

        Args:
            image_size (tuple[int, int] | None): Target size. Defaults to ``(256, 256)``.

        Returns:
            PreProcessor: Pre-processor with a resize transform.

        """
        return PreProcessor(transform=Compose([Resize(image_size or (256, 256), antialias=True)]))

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC/F1, pixel AUROC/F1 and PRO (AUPRO up to 30% FPR) on the test set."""
        test_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
        ]
        return Evaluator(test_metrics=test_metrics)

    @staticmethod
    def _check_sizes(n_superpixels: int, image_size: tuple[int, int] | None) -> None:
        """Refuse an ``image_size`` PEN-Net cannot take or with fewer pixels than superpixels."""
        if image_size is None:  # a custom pre-processor: SmaiModel checks each batch
            return
        if len(image_size) != 2 or any(side < SIZE_MULTIPLE or side % SIZE_MULTIPLE for side in image_size):
            msg = f"image_size must be (height, width), each a positive multiple of {SIZE_MULTIPLE}, got {image_size}."
            raise ValueError(msg)
        if n_superpixels > image_size[0] * image_size[1]:
            msg = (
                f"n_superpixels ({n_superpixels}) exceeds the {image_size[0] * image_size[1]} pixels of "
                f"{image_size[0]}x{image_size[1]} images: lower n_superpixels or raise image_size."
            )
            raise ValueError(msg)

    @classmethod
    def checkpoint_safe_globals(cls) -> tuple[type, ...]:
        """SMAI's enums in ``hyper_parameters``, allowed for anomalib's ``weights_only`` loading."""
        return (ScoringMode, ScoreMeasure)

    def setup(self, stage: str) -> None:
        """Let DDP find unused parameters when fitting.

        The discriminator and the generator step after separate backward passes, and the
        discriminator's does not reach the generator's parameters, so plain DDP would stop
        with "parameters that were not used in producing the loss".
        """
        ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        if stage == "fit" and isinstance(self.trainer.strategy, DDPStrategy) and isinstance(ddp_kwargs, dict):
            if not ddp_kwargs.get("find_unused_parameters"):
                rank_zero_info("SMAI: enabling DDP's find_unused_parameters (separate generator/discriminator steps).")
            ddp_kwargs["find_unused_parameters"] = True

    def on_fit_start(self) -> None:
        """Check the training and validation files before training (see :mod:`.data_checks`)."""
        datamodule = self.trainer.datamodule
        for split in ("train", "val"):
            dataset = getattr(datamodule, f"{split}_data", None)
            if dataset is not None:
                check_dataset(dataset, split)

    def on_test_start(self) -> None:
        """Check the test files before scoring them."""
        check_dataloaders(self.trainer.test_dataloaders, "test")

    def on_predict_start(self) -> None:
        """Check the files to predict before scoring them."""
        check_dataloaders(self.trainer.predict_dataloaders, "predict")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also save torch's random state, which draws the holes and shuffles the data."""
        super().on_save_checkpoint(checkpoint)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        checkpoint["smai_rng_state"] = {"torch": torch.get_rng_state(), "cuda": cuda}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the saved random state for :meth:`on_train_start` of a resumed fit."""
        super().on_load_checkpoint(checkpoint)
        self._saved_rng_state = checkpoint.get("smai_rng_state")
        trainer = self._trainer
        if trainer is not None and not trainer.training and checkpoint.get("global_step", 0) < trainer.global_step:
            # anomalib's Engine.train (``anomalib train --ckpt_path``) also tests the checkpoint it resumed from.
            rank_zero_warn(
                f"Scoring the checkpoint of step {checkpoint.get('global_step')}, not the model this trainer just "
                f"trained to step {trainer.global_step}: `anomalib train --ckpt_path` tests the checkpoint it "
                "resumed from. Resume with `anomalib fit --ckpt_path ...`, then run `anomalib test` on the last "
                "checkpoint."
            )

    def on_train_start(self) -> None:
        """Refuse a pre-processor that normalises: PEN-Net needs images in ``[0, 1]``.

        When resuming (``ckpt_path``), also restore the random state saved with the checkpoint,
        so a resumed run draws the same holes whatever the seed of the new process.
        """
        # anomalib's Rich progress bar shows "Epoch i/N" with N estimated from trainer.max_steps,
        # which counts both optimisers' steps: estimate it from SMAI's iterations instead.
        bar, batches = self.trainer.progress_bar_callback, self.trainer.num_training_batches
        if getattr(bar, "est_max_epochs", None) is not None and isinstance(batches, int) and batches > 0:
            bar.est_max_epochs = math.ceil(self.max_steps / batches)
        rng_state = getattr(self, "_saved_rng_state", None)
        if self.trainer.ckpt_path and rng_state is not None:
            torch.set_rng_state(rng_state["torch"])
            if rng_state["cuda"] and len(rng_state["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng_state["cuda"])
            self._saved_rng_state = None
        if self.pre_processor and extract_transforms_by_type(self.pre_processor.transform, Normalize):
            msg = "SMAI's pre-processor must not normalise images (SMAI works on [0, 1] RGB): remove Normalize."
            raise ValueError(msg)

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
        self._check_finite(batch)
        with torch.no_grad():
            images, holes = self.model.training_inputs(batch.image, self.n_masked)
        output, pyramid = self.model(images, holes)
        originals = images * 2 - 1
        composite = originals * (1 - holes) + output * holes
        generator_optimizer, discriminator_optimizer = self.optimizers()

        discriminator_loss = discriminator_hinge_loss(
            self.discriminator(originals), self.discriminator(composite.detach())
        )
        discriminator_optimizer.zero_grad()
        self.manual_backward(discriminator_loss)
        discriminator_optimizer.step()

        terms = self.loss(originals, holes, output, pyramid, self.discriminator(composite))
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
        self._check_finite(batch)
        return batch.update(**self.model(batch.image)._asdict())

    @staticmethod
    def _check_finite(batch: Batch) -> None:
        """Value checks live here, outside the exported graph (see DESIGN.md)."""
        finite = torch.isfinite(batch.image).flatten(1).all(1)
        if not finite.all():
            bad = (~finite).nonzero().flatten().tolist()
            paths = getattr(batch, "image_path", None)
            names = [str(paths[index]) for index in bad] if paths else [f"batch index {index}" for index in bad]
            msg = f"Input images contain NaN or infinite values: {', '.join(names)}. Check the data and the transforms."
            raise ValueError(msg)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs,
    ) -> Path:
        """Export to ONNX with opset 18, which PEN-Net's attention needs (``fold`` is ``Col2Im``).

        The graph holds the whole pipeline: resize, superpixels, every inpainting pass, the
        scoring and anomalib's post-processing. With ``input_size=None`` the input's height and
        width stay dynamic (the pre-processor resizes to the model's size). Other arguments go
        to :meth:`anomalib.models.AnomalibModule.to_onnx`.
        """
        kwargs.setdefault("opset_version", ONNX_OPSET)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Train by steps and validate once, at the end.

        Scoring is costly (many inpaintings per image), so validation, which fits the
        post-processor's thresholds, runs once after the last training step rather than
        every epoch.
        """
        return {
            "max_steps": 2 * self.max_steps,
            "max_epochs": -1,
            "check_val_every_n_epoch": None,
            "val_check_interval": self.max_steps,
            "num_sanity_val_steps": 0,
        }

    @property
    def learning_type(self) -> LearningType:
        """SMAI learns from normal images only."""
        return LearningType.ONE_CLASS


_autoload.expose(Smai)
