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

import json
import re
import zipfile
from contextvars import ContextVar
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from .anomaly_map import Comparison
from .calibration import Calibration
from .errors import MissingCheckpointError, SmaiInputError, listing
from .schedule import ScoringMode
from .similarity import ScoreMeasure

__all__ = ["CheckedCheckpointIO", "SmaiCheckpointMixin", "check_checkpoint_file"]

# Map settings newer than some checkpoints, and the value that gives the maps those checkpoints were calibrated with.
SETTINGS_BEFORE_SAVED = {"memory_dilation": 1}
# The file ``load_from_checkpoint`` reads, for messages from the hooks it calls (a trainer knows its ckpt_path).
_loading: ContextVar[str | None] = ContextVar("smai_loading_checkpoint", default=None)


def _shell(value: Any) -> str:
    """Write a plain setting as a command-line value (JSON, quoted unless it is one word)."""
    text = json.dumps(value)
    return text if re.fullmatch(r"[\w.+-]+", text) else f"'{text}'"


def _plain(value: Any) -> Any:
    """Turn a setting into plain data, for comparing and printing (enums by value, tuples as lists)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


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

    It also remembers the checkpoints it wrote or read that lack the calibration after training
    (saved at an iteration, before the validation that calibrates), with their step, so that the
    model can write them again once that validation has run (see
    :meth:`SmaiCheckpointMixin.save_completed_checkpoints`).

    Args:
        inner (CheckpointIO): The reader and writer it wraps (anomalib's, or Lightning's default).

    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner
        self.uncalibrated: dict[str, int] = {}  # path -> global step

    def _remember(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        if checkpoint.get("smai_calibration_stale"):
            self.uncalibrated[str(path)] = checkpoint.get("global_step", -1)
        else:
            self.uncalibrated.pop(str(path), None)

    def load_checkpoint(self, path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Check a local file with :func:`check_checkpoint_file`, then read it with the wrapped reader."""
        if not Path(path).is_file():  # Lightning names missing files, torch fetches URLs
            return self.inner.load_checkpoint(path, *args, **kwargs)
        check_checkpoint_file(path)
        checkpoint = self.inner.load_checkpoint(path, *args, **kwargs)
        self._remember(checkpoint, path)
        return checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, *args: Any, **kwargs: Any) -> None:
        """Save with the wrapped writer."""
        self.inner.save_checkpoint(checkpoint, path, *args, **kwargs)
        self._remember(checkpoint, path)

    def remove_checkpoint(self, path: str | Path, *args: Any, **kwargs: Any) -> None:
        """Remove with the wrapped writer."""
        self.inner.remove_checkpoint(path, *args, **kwargs)
        self.uncalibrated.pop(str(path), None)

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
        token = _loading.set(str(checkpoint_path))
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            _loading.reset(token)

    def _refuse_other_weights(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in a few lines, a checkpoint whose weights do not fit this model (before torch lists them all).

        Another model's checkpoint names its hyper-parameters; a SMAI checkpoint of other
        settings names the settings that differ and the arguments that load it.
        """
        saved = checkpoint.get("state_dict")
        if saved is None:
            return
        trainer = self._trainer
        path = (trainer.ckpt_path if trainer is not None else None) or _loading.get()
        saved_settings = checkpoint.get("hyper_parameters", {})
        if not any(key.startswith("model.generator.") for key in saved):
            keys = ", ".join(sorted(saved_settings)) or "none"
            own_keys = [key for key in saved if key.startswith("model.")] or list(saved)
            msg = (
                f"The checkpoint {path} does not hold a SMAI model (its weights: {listing(own_keys)}; its "
                f"settings: {keys}): it was saved by another model. Load it with that model (e.g. --model Padim), "
                "or pass a SMAI checkpoint."
            )
            raise SmaiInputError(msg)
        own = self.state_dict()
        fitted = ("normal_statistics.", "memory.")  # sized by the data they were fitted on (the memory: only such)
        differ = [
            key
            for key in saved.keys() & own.keys()
            if saved[key].shape != own[key].shape and not any(name in key for name in fitted)
        ]
        if not differ:
            return
        current = dict(self.hparams)
        changed = {
            name: (_plain(value), _plain(current[name]))
            for name, value in saved_settings.items()
            if name in current and _plain(current[name]) != _plain(value)
        }
        if not changed:  # settings overridden when loading (load_from_checkpoint(path, base_channels=...))
            msg = (
                f"The checkpoint {path} holds SMAI weights of other shapes than this model's ({listing(differ)}): "
                "load it with the settings it was trained with (do not override base_channels, "
                "discriminator_channels or local_attention)."
            )
            raise SmaiInputError(msg)
        listed = ", ".join(f"{name}={saved!r} (here {here!r})" for name, (saved, here) in changed.items())
        arguments = " ".join(f"--model.{name} {_shell(saved)}" for name, (saved, _) in changed.items())
        msg = (
            f"The checkpoint {path} holds a SMAI model trained with other settings: {listed}. Load it with the "
            f"training's settings: on the command line add {arguments} (or the training's --config); in Python, "
            "Smai.load_from_checkpoint(path) reads them from the checkpoint."
        )
        raise SmaiInputError(msg)

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
        self._refuse_other_weights(checkpoint)
        super().on_load_checkpoint(checkpoint)
        if "state_dict" in checkpoint:
            weights = {
                key: value for key, value in checkpoint["state_dict"].items() if not key.startswith("evaluator.")
            }
            metrics = {key: value for key, value in self.state_dict().items() if key.startswith("evaluator.")}
            checkpoint["state_dict"] = weights | metrics
        self._saved_rng_state = checkpoint.get("smai_rng_state")
        saved, current = checkpoint.get("smai_map_settings", {}), self._map_settings()
        if saved:  # in today's terms: settings added since took the value that reproduces its maps then
            saved = {**{name: SETTINGS_BEFORE_SAVED[name] for name in SETTINGS_BEFORE_SAVED.keys() & current}, **saved}
            if isinstance(saved.get("memory_neighbourhood"), int):  # one window, saved before there could be several
                saved["memory_neighbourhood"] = [saved["memory_neighbourhood"]]
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

    def save_completed_checkpoints(self) -> None:
        """Write the checkpoints of the last iteration again, now with the calibration after training.

        A checkpoint callback that saves every N iterations (or ``save_last``) writes the last
        iteration's checkpoint before the validation that calibrates and fits the thresholds, and
        a fit resumed from such a checkpoint starts at its end; called after that validation, this
        writes every such file of the current step again, complete (they hold the same weights),
        so that it tests and exports without calibrating.
        """
        trainer = self.trainer
        checkpoint_io = trainer.strategy.checkpoint_io
        step = trainer.global_step
        paths = []
        if isinstance(checkpoint_io, CheckedCheckpointIO):
            paths = sorted(path for path, saved in checkpoint_io.uncalibrated.items() if saved == step)
        for path in trainer.strategy.broadcast(paths, src=0):  # every process saves (Lightning's barrier)
            rank_zero_info(f"SMAI: saving {path} again, with the calibration and thresholds fitted after training.")
            trainer.save_checkpoint(path)
