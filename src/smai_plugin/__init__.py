"""SMAI: Superpixel Masking And Inpainting for anomaly detection, as an anomalib model.

Installing the package registers ``Smai`` with anomalib (see :mod:`smai_plugin._autoload`),
so anomalib users select it like a built-in model:

Example:
    >>> from anomalib.models import get_model
    >>> model = get_model("smai", n_superpixels=77, n_masked=10)  # doctest: +SKIP
    >>> from smai_plugin import Smai
    >>> model = Smai(score_measure="l2")  # doctest: +SKIP

Every input SMAI refuses raises :class:`SmaiInputError` (a ``ValueError``) whose message names
the setting, file or folder and the fix.

The heavy imports (torch, anomalib) happen only when ``Smai`` or ``SmaiModel`` is first used,
so the start-up hook costs nothing for Python programs that never touch anomalib.

"""

from typing import TYPE_CHECKING, Any

from .errors import SmaiInputError

__all__ = ["Smai", "SmaiInputError", "SmaiModel", "SmaiVisualizer"]

if TYPE_CHECKING:
    from .lightning_model import Smai
    from .torch_model import SmaiModel
    from .visualizer import SmaiVisualizer


def __getattr__(name: str) -> Any:
    if name == "Smai":
        from .lightning_model import Smai

        return Smai
    if name == "SmaiModel":
        from .torch_model import SmaiModel

        return SmaiModel
    if name == "SmaiVisualizer":
        from .visualizer import SmaiVisualizer

        return SmaiVisualizer
    msg = f"module 'smai_plugin' has no attribute {name!r}"
    raise AttributeError(msg)
