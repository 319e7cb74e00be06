"""A check of checkpoint files before torch reads them.

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

from lightning.pytorch.plugins.io import CheckpointIO

from .errors import MissingCheckpointError, SmaiInputError

__all__ = ["CheckedCheckpointIO", "check_checkpoint_file"]


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
