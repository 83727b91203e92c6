"""Pretrained backbone weights: torchvision's ImageNet weights through its weights API and hub cache, or a local
torchvision-format state dict. Online, torchvision downloads a file once into ``$TORCH_HOME/hub/checkpoints``;
offline, the error names the file, the cache folder and the URL. Used by :func:`trainables.models.build_reid_model`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

logger = logging.getLogger(__name__)


def _describe_keys(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_backbone_state(model: nn.Module, state: object, source: str | Path) -> str:
    """Strictly load a torchvision ResNet state dict (``fc.*`` ignored) into ``model.backbone`` (or ``model``).

    ``source`` names the file in errors and in the returned one-line log description.
    """
    target = getattr(model, "backbone", model)
    if not isinstance(state, dict):
        raise ValueError(f"{source}: expected a torchvision state dict, got {type(state).__name__}")
    ignored = [k for k in state if k.startswith("fc.")]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the {getattr(model, 'backbone_name', 'backbone')} architecture: "
            f"missing keys [{_describe_keys(missing)}], unexpected keys [{_describe_keys(unexpected)}]"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(
            f"{source} does not match the backbone: {len(bad)} shape mismatches, first {k} "
            f"{tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        )
    target.load_state_dict(state, strict=True)
    return f"loaded {len(state)} backbone tensors from {source} (ignored {len(ignored)} fc.* keys)"


def load_pretrained_backbone(model: nn.Module, path: str | Path) -> str:
    """Load a LOCAL torchvision-format ResNet state dict (e.g. resnet50-0676ba61.pth) into the backbone.

    ``fc.*`` keys are ignored; every other key must match (names and shapes). Accepts a model with a
    ``.backbone`` or a bare trunk. Returns a one-line description for logs. Never downloads.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone file not found: {path}")
    return _load_backbone_state(model, torch.load(path, map_location="cpu", weights_only=True), path)


# IMAGENET1K_V1, not V2: V1 (resnet50 top-1 76.1%) are the original weights that torchvision's old
# ``pretrained=True`` loaded, i.e. what the paper-era re-ID code (LSRO/MpRL, layumi's baseline) started from.
# V2 (80.9%) comes from a 2021 recipe (long schedule, heavy augmentation) and is a different starting point
# that the paper's numbers do not cover.
IMAGENET_WEIGHTS: dict[str, torchvision.models.WeightsEnum] = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
}


def imagenet_cache_file(backbone: str) -> Path:
    """Where torchvision keeps ``backbone``'s ImageNet weights: ``torch.hub.get_dir()/checkpoints/<URL basename>``
    (``$TORCH_HOME/hub/checkpoints`` unless ``torch.hub.set_dir`` moved it)."""
    if backbone not in IMAGENET_WEIGHTS:
        raise ValueError(f"reid.backbone must be one of {list(IMAGENET_WEIGHTS)} for imagenet weights, "
                         f"got {backbone!r}")
    url = IMAGENET_WEIGHTS[backbone].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _offline_message(backbone: str, cached: Path, err: BaseException) -> str:
    url = IMAGENET_WEIGHTS[backbone].url
    return (
        f"reid.pretrained=imagenet: torchvision's ImageNet weights for {backbone} ({cached.name}) are not in the "
        f"torch hub cache {cached.parent} and downloading {url} failed ({type(err).__name__}: {err}). "
        f"On a machine with internet, download {url} and copy it to {cached} "
        f"(the cache is $TORCH_HOME/hub/checkpoints), or pass reid.pretrained=/path/to/{cached.name}"
    )


def load_imagenet_backbone(model: nn.Module, backbone: str) -> str:
    """Load torchvision's ImageNet weights for ``backbone`` through its weights API and hub cache.

    A cached file is loaded as is (torch hub trusts its cache; ``check_hash`` verifies a download before it
    is moved into the cache). Otherwise torchvision downloads it once; offline, a FileNotFoundError names
    the file, the cache folder and the URL. Returns a one-line description for logs.
    """
    cached = imagenet_cache_file(backbone)
    present = cached.is_file()
    if not present:
        logger.info("downloading torchvision's ImageNet weights for %s to %s", backbone, cached)
    try:
        state = IMAGENET_WEIGHTS[backbone].get_state_dict(
            progress=True, check_hash=True, map_location="cpu", weights_only=True
        )
    except Exception as err:  # a damaged file makes torch.load raise almost anything (IndexError, EOFError...)
        if present:
            raise RuntimeError(
                f"reid.pretrained=imagenet: the cached file {cached} cannot be read ({type(err).__name__}: "
                f"{err}); delete it and run again to download it anew"
            ) from err
        if not isinstance(err, (OSError, RuntimeError)):  # URLError/HTTPError/timeouts; RuntimeError: bad hash
            raise
        raise FileNotFoundError(_offline_message(backbone, cached, err)) from err
    return _load_backbone_state(model, state, cached)


def init_backbone(model: nn.Module, backbone: str, pretrained: str | Path | None) -> None:
    """Apply ``reid.pretrained``: imagenet | random (on purpose) | a local file | None (not chosen: warn)."""
    if pretrained is None:
        logger.warning("reid backbone %s starts from random init (reid.pretrained not set; the paper uses "
                       "imagenet)", backbone)
    elif pretrained == "random":
        logger.info("reid backbone %s starts from random init (reid.pretrained=random)", backbone)
    elif pretrained == "imagenet":
        logger.info(load_imagenet_backbone(model, backbone))
    else:
        logger.info(load_pretrained_backbone(model, pretrained))
