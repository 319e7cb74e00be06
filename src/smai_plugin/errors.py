"""SMAI's refusals of bad input, and how anomalib's command line shows them.

Every setting, file, folder or checkpoint that SMAI refuses raises :class:`SmaiInputError` (a
``ValueError``) with a message that names what was refused and the fix. In Python the error
propagates as usual. Under anomalib's command line (``anomalib train ...``) the message would
arrive at the end of a long rich traceback, or, for a model setting, inside jsonargparse's
"Does not validate against any of the Union subtypes" report; there the first refusal installs
an exception hook that prints only the message (two lines), unless ``SMAI_TRACEBACK=1`` asks for
the full traceback. Errors that are not SMAI's refusals reach anomalib's own hook unchanged.

Example:
    >>> try:
    ...     raise SmaiInputError("n_superpixels must be a whole number of at least 1, got 2.5.")
    ... except ValueError as error:
    ...     print(error)
    n_superpixels must be a whole number of at least 1, got 2.5.

"""

import os
import sys
from types import TracebackType

__all__ = ["SmaiInputError", "listing"]

TRACEBACK_VARIABLE = "SMAI_TRACEBACK"
_refusals: list[str] = []  # messages refused in this process, to find them inside other errors' text


class SmaiInputError(ValueError):
    """A setting, file, folder or checkpoint that SMAI refuses; the message says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        _refusals.append(message)
        if "anomalib.cli.cli" in sys.modules:
            _install_cli_hook()


class MissingCheckpointError(SmaiInputError, FileNotFoundError):
    """A checkpoint path with no file behind it (also a ``FileNotFoundError``)."""


def listing(items: list) -> str:
    """List the first three items for a message, comma-separated, with "..." when there are more.

    Example:
        >>> listing(["a.png", "b.png", "c.png", "d.png"])
        'a.png, b.png, c.png, ...'

    """
    return ", ".join(map(str, items[:3])) + (", ..." if len(items) > 3 else "")


def refusal_in(error: BaseException) -> str | None:
    """Find the SMAI refusal behind ``error``: in its chain of causes, or quoted in its message.

    jsonargparse reports a model setting that ``Smai`` refused as text inside its own error
    (the original exception is not chained), so the text is searched for refused messages.

    Example:
        >>> refused = SmaiInputError("learning_rate must be positive, got -1.")
        >>> refusal_in(ValueError(f"Does not validate. Errors: {refused}"))
        'learning_rate must be positive, got -1.'
        >>> refusal_in(KeyError("other")) is None
        True

    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, SmaiInputError):
            return str(current)
        text = str(current)
        quoted = next((message for message in reversed(_refusals) if message.splitlines()[0] in text), None)
        if quoted is not None:
            return quoted
        current = current.__cause__ or current.__context__
    return None


def _install_cli_hook() -> None:
    """Wrap the current ``sys.excepthook`` (anomalib's rich traceback) once."""
    previous = sys.excepthook
    if getattr(previous, "smai_refusal_hook", False):
        return

    def show_refusal(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
        message = refusal_in(error)
        if message is None or os.environ.get(TRACEBACK_VARIABLE) == "1":
            previous(kind, error, trace)
            return
        print(f"SMAI refused the input: {message}", file=sys.stderr)
        print(f"(The full traceback: rerun with {TRACEBACK_VARIABLE}=1.)", file=sys.stderr)

    show_refusal.smai_refusal_hook = True  # type: ignore[attr-defined]
    sys.excepthook = show_refusal
