"""What the benchmark scripts share: a config's model arguments, without its metrics.

Every script builds SMAI from an anomalib CLI config (``configs/*.yaml``) and chooses its own
metrics, so the config's ``evaluator`` (a ``class_path`` spec, which only anomalib's CLI builds)
is left out.

Example:
    >>> sorted(model_init_args("configs/smai_cpu.yaml", max_steps=5))[:3]
    ['base_channels', 'calibration', 'comparison']

"""

from pathlib import Path
from typing import Any

import yaml


def model_init_args(config: Path | str, **overrides: Any) -> dict[str, Any]:
    """The config's ``model.init_args`` without ``evaluator``, updated with ``overrides``."""
    init_args = dict(yaml.safe_load(Path(config).read_text())["model"]["init_args"])
    init_args.pop("evaluator", None)
    return {**init_args, **overrides}
