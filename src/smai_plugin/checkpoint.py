"""What SMAI keeps in a checkpoint, and a check of checkpoint files before torch reads them.

Besides anomalib's content, a SMAI checkpoint holds torch's random state (a resumed fit draws
the same holes), whether the normal statistics are stale (saved during training, before the
calibration that follows it), what the generator was trained on (crops or whole images: scoring
with the other family warns) and the settings the statistics were fitted under (loading with
other scoring settings calibrates again). :class:`SmaiCheckpointMixin` adds these to
:class:`~smai_plugin.Smai`.

torch reports a damaged checkpoint without naming it: a truncated file gives "PytorchStreamReader
failed reading zip archive", a damaged one an ``EOFError`` with an empty message or a
``KeyError`` with a number. Lightning saves checkpoints as zip archives with a checksum per
entry, so :func:`check_checkpoint_file` can tell, before anything is loaded, whether a file is
complete and undamaged, and say which file is not. The Lightning model calls it in
``load_from_checkpoint`` (the Python API, ``anomalib export --ckpt_path``), and wraps the
trainer's checkpoint reader in :class:`CheckedCheckpointIO` for ``anomalib fit/test/predict
--ckpt_path``: Lightning reads ``ckpt_path`` after the model's ``setup`` without showing the path
to any hook before.

Example:
    >>> import tempfile
    >>> import torch
    >>> path = Path(tempfile.mkdtemp()) / "model.ckpt"
    >>> torch.save({"state_dict": {}}, path)
    >>> check_checkpoint_file(path)
    >>> path.write_bytes(path.read_bytes()[:100])
    100
    >>> check_checkpoint_file(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    smai_plugin.errors.SmaiInputError: The checkpoint .../model.ckpt is not a complete PyTorch checkpoint (100 bytes...

"""

import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from .anomaly_map import Comparison
from .calibration import Calibration
from .errors import MissingCheckpointError, SmaiInputError
from .schedule import ScoringMode
from .similarity import ScoreMeasure

__all__ = ["CheckedCheckpointIO", "SmaiCheckpointMixin", "check_checkpoint_file"]


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse a checkpoint file that is missing, truncated or damaged, naming it.

    Args:
        path (str | Path): The checkpoint.

    Raises:
        FileNotFoundError: If there is no file at ``path``.
        ValueError: If the file is not a complete zip archive or an entry fails its checksum.

    """
    path = Path(path)
    if not path.is_file():
        msg = (
            f"No checkpoint file at {path}: check the path "
            "(anomalib saves results/Smai/<dataset>/<category>/latest/weights/lightning/model.ckpt)."
        )
        raise MissingCheckpointError(msg)
    fix = "train again, or use another checkpoint (e.g. last.ckpt, or one from an earlier run)"
    if not zipfile.is_zipfile(path):
        msg = (
            f"The checkpoint {path} is not a complete PyTorch checkpoint ({path.stat().st_size} bytes; "
            f"truncated, empty or another kind of file): {fix}."
        )
        raise SmaiInputError(msg)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        msg = f"The checkpoint {path} is damaged ({error}): {fix}."
        raise SmaiInputError(msg) from error
    if damaged is not None:
        msg = f"The checkpoint {path} is damaged (entry {damaged} fails its checksum): {fix}."
        raise SmaiInputError(msg)


class CheckedCheckpointIO(CheckpointIO):
    """A trainer's checkpoint reader and writer that checks files before reading them.

    Args:
        inner (CheckpointIO): The reader and writer it wraps (anomalib's, or Lightning's default).

    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def load_checkpoint(self, path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Check a local file with :func:`check_checkpoint_file`, then read it with the wrapped reader."""
        if Path(path).is_file():  # local files only: Lightning names missing ones, torch fetches URLs
            check_checkpoint_file(path)
        return self.inner.load_checkpoint(path, *args, **kwargs)

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        """Save with the wrapped writer."""
        self.inner.save_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        """Remove with the wrapped writer."""
        self.inner.remove_checkpoint(*args, **kwargs)

    def teardown(self) -> None:
        """Tear down the wrapped reader and writer."""
        self.inner.teardown()


class SmaiCheckpointMixin:
    """Checkpoint hooks of :class:`~smai_plugin.Smai`: SMAI's state in, checked files out.

    Mixed in before ``AnomalibModule``; reads the Lightning model's ``model`` (the torch model),
    ``input_size``, ``_calibration_stale`` and ``_trained_on``.
    """

    @classmethod
    def checkpoint_safe_globals(cls) -> tuple[type, ...]:
        """SMAI's enums in ``hyper_parameters``, allowed for anomalib's ``weights_only`` loading."""
        return (ScoringMode, ScoreMeasure, Comparison, Calibration)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args, **kwargs) -> Any:
        """Load a checkpoint (:meth:`anomalib.models.AnomalibModule.load_from_checkpoint`).

        A missing, truncated or damaged file is refused first with its path (see
        :func:`check_checkpoint_file`); torch's own errors do not name it.
        """
        if "://" not in str(checkpoint_path):  # URLs go to torch as they are
            check_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def _map_settings(self) -> dict[str, Any]:
        """Collect the torch model's map settings and the image size the pre-processor resizes to."""
        size = self.input_size
        return {**self.model.map_settings(), "image_size": None if size is None else [int(side) for side in size]}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also save torch's random state, whether the statistics are stale, the training family, the map settings."""
        super().on_save_checkpoint(checkpoint)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        checkpoint["smai_rng_state"] = {"torch": torch.get_rng_state(), "cuda": cuda}
        checkpoint["smai_calibration_stale"] = self._calibration_stale
        checkpoint["smai_trained_on"] = self._trained_on
        # The settings the statistics were fitted under (``hyper_parameters`` take overrides on loading).
        checkpoint["smai_map_settings"] = self._map_settings()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read SMAI's state; warn when the checkpoint is scored in a way it was not trained for.

        The evaluator's entries are replaced by this model's own: metrics hold no learnt state, and a
        checkpoint trained with other metrics (a config's AUPRO keeps a buffer) must still load.
        """
        super().on_load_checkpoint(checkpoint)
        if "state_dict" in checkpoint:
            weights = {
                key: value for key, value in checkpoint["state_dict"].items() if not key.startswith("evaluator.")
            }
            metrics = {key: value for key, value in self.state_dict().items() if key.startswith("evaluator.")}
            checkpoint["state_dict"] = weights | metrics
        self._saved_rng_state = checkpoint.get("smai_rng_state")
        saved, current = checkpoint.get("smai_map_settings", {}), self._map_settings()
        changed = [name for name, value in saved.items() if current.get(name) != value]
        self._calibration_stale = bool(checkpoint.get("smai_calibration_stale", False)) or bool(changed)
        if changed and self.model.calibration != Calibration.NONE:
            rank_zero_info(f"SMAI: {', '.join(changed)} changed since the checkpoint; calibrating again.")
        self._trained_on = checkpoint.get("smai_trained_on")
        if self._trained_on not in {None, self.model.training_family}:
            # Measured on bottle: whole-image weights scored on crops gave pixel AUROC 0.706, image 0.500.
            rank_zero_warn(
                f"This SMAI checkpoint was trained on {self._trained_on}, but is set to score with "
                f"{self.model.training_family}. A generator scores poorly on inputs it was not trained on: "
                "load it with the scoring it was trained for (e.g. Smai.load_from_checkpoint(path, "
                "scoring=...) or --model.scoring ...), or train it again with this scoring."
            )
        trainer = self._trainer
        if trainer is not None and not trainer.training and checkpoint.get("global_step", 0) < trainer.global_step:
            # anomalib's Engine.train (``anomalib train --ckpt_path``) also tests the checkpoint it resumed from.
            rank_zero_warn(
                f"Scoring the checkpoint of step {checkpoint.get('global_step')}, not the model this trainer just "
                f"trained to step {trainer.global_step}: `anomalib train --ckpt_path` tests the checkpoint it "
                "resumed from. Resume with `anomalib fit --ckpt_path ...`, then run `anomalib test` on the last "
                "checkpoint."
            )

    def restore_random_state(self) -> None:
        """When resuming (``ckpt_path``), restore the random state saved with the checkpoint.

        A resumed run then draws the same holes whatever the seed of the new process.
        """
        rng_state = getattr(self, "_saved_rng_state", None)
        if self.trainer.ckpt_path and rng_state is not None:
            torch.set_rng_state(rng_state["torch"])
            if rng_state["cuda"] and len(rng_state["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng_state["cuda"])
            self._saved_rng_state = None
