"""Re-ID networks: the identification net (ResNet + K-way classifier) and the two-stream net.

Both follow the MpRL / LSRO papers (docs/protocol.md): an ImageNet ResNet trunk, global average pooling,
dropout and a new K-way FC; the two-stream net adds a verification head on the squared difference of the two
embeddings. An optional bottleneck (Linear + BN + LeakyReLU, as in layumi's ClassBlock) gives the common
PyTorch re-ID baseline; ``embed_dim=None`` is the paper's plain 2048-d pool5 + dropout + FC.

Contract (timm-like): ``forward_features`` -> pooled backbone feature, ``embed`` -> retrieval embedding,
``classify`` -> logits in any mode, ``forward`` -> logits in training mode and the embedding in eval mode.
No device flags: move the model with ``.to(device)`` as usual.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from trainables.config import BACKBONES  # the choice lists (torchvision names)
from trainables.config import REID_MODELS as MODEL_KINDS

IdLossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without avgpool/fc: image [B, 3, H, W] -> feature map [B, F, h, w].

    Child names match torchvision's, so an ImageNet state dict (minus ``fc.*``) loads strictly.
    """

    def __init__(self, net: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _set_last_stride(trunk: ResNetTrunk, stride: int) -> None:
    """Set the stride of layer4's first block (main path and shortcut); stride 1 doubles the final map."""
    for module in trunk.layer4[0].modules():
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (stride, stride)


def build_backbone(name: str, *, last_stride: int = 2) -> tuple[nn.Module, int]:
    """Randomly initialised ResNet trunk (weights=None, never a download) and its feature width F."""
    if name not in BACKBONES:
        raise ValueError(f"reid.backbone must be one of {list(BACKBONES)}, got {name!r}")
    if last_stride not in (1, 2):
        raise ValueError(f"reid.last_stride must be 1 or 2, got {last_stride!r}")
    if name == "tiny":
        return tiny_trunk(), TINY_WIDTH
    net = getattr(torchvision.models, name)(weights=None)
    trunk, feat_dim = ResNetTrunk(net), net.fc.in_features
    if last_stride == 1:
        _set_last_stride(trunk, 1)
    return trunk, feat_dim


TINY_WIDTH = 64


def tiny_trunk() -> nn.Module:
    """Four stride-2 conv-BN-ReLU layers (~60k parameters): the scale rehearsal's stand-in for a ResNet, so that a
    run at Market-1501's counts exercises the whole pipeline in minutes on CPUs. Output [B, 64, H/16, W/16]."""
    layers: list[nn.Module] = []
    for c_in, c_out in ((3, 16), (16, 32), (32, 64), (64, TINY_WIDTH)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _init_new_layers(bottleneck: nn.Module | None, classifier: nn.Linear) -> None:
    """layumi ClassBlock init: kaiming Linear, BN weight ~ N(1, 0.02), classifier ~ N(0, 0.001)."""
    if bottleneck is not None:
        for m in bottleneck.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
    nn.init.normal_(classifier.weight, std=0.001)
    nn.init.zeros_(classifier.bias)


def _check_dropout(field: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{field} must be in [0, 1), got {p!r}")


class IdentificationNet(nn.Module):
    """ResNet -> GAP -> [bottleneck] -> dropout -> Linear(num_classes).

    ``self.backbone`` holds the pretrained-able trunk; every other parameter is a "new" layer (see
    ``param_groups``).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str = "resnet50",
        embed_dim: int | None = 512,
        dropout: float = 0.5,
        last_stride: int = 2,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        if embed_dim is not None and embed_dim < 1:
            raise ValueError(f"reid.embed_dim must be a positive int or None, got {embed_dim!r}")
        _check_dropout("reid.dropout", dropout)
        self.backbone, self.feat_dim = build_backbone(backbone, last_stride=last_stride)
        self.backbone_name = backbone
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bottleneck: nn.Sequential | None = None
        if embed_dim is not None:
            self.bottleneck = nn.Sequential(
                nn.Linear(self.feat_dim, embed_dim), nn.BatchNorm1d(embed_dim), nn.LeakyReLU(0.1)
            )
        self.embed_dim = embed_dim if embed_dim is not None else self.feat_dim
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        self.num_classes = num_classes
        _init_new_layers(self.bottleneck, self.classifier)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone feature: [B, 3, H, W] -> [B, F]."""
        return torch.flatten(self.pool(self.backbone(x)), 1)

    def _embed_pooled(self, feat: torch.Tensor) -> torch.Tensor:
        # [B, F] -> [B, D]
        return feat if self.bottleneck is None else self.bottleneck(feat)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Retrieval embedding [B, D]: the bottleneck output, or the pooled feature without one."""
        return self._embed_pooled(self.forward_features(x))

    def embed_and_classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One trunk pass -> (embedding [B, D], logits [B, C]); dropout applies only to the logits path."""
        emb = self.embed(x)
        return emb, self.classify_embedding(emb)

    def classify_embedding(self, emb: torch.Tensor) -> torch.Tensor:
        """The K-way head [B, D] -> [B, C], in float32 even under autocast: dMpRL / pseudo labels rank these
        logits, and in bf16 about half of 751 classes tie with another (docs/labels.md: ranks need an order)."""
        with torch.autocast(emb.device.type, enabled=False):
            return self.classifier(self.dropout(emb.float()))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] in either mode (dropout is active only in training mode)."""
        return self.embed_and_classify(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training mode: logits [B, C]. Eval mode: embedding [B, D]."""
        return self.classify(x) if self.training else self.embed(x)

    def param_groups(
        self, base_lr: float, new_lr_mult: float = 10.0, weight_decay: float = 5e-4, scheme: str = "paper"
    ) -> list[dict]:
        """Optimizer groups. ``paper``: backbone at ``base_lr``, all new layers at ``base_lr * new_lr_mult``.
        ``reference_code``: one group per parameter class with the authors' MatConvNet multipliers
        (:data:`REFERENCE_CODE_RATES`), ``base_lr`` being the conv filters' rate.

        New layers = everything outside ``self.backbone`` (bottleneck, classifier, verification head). Each
        group carries a ``name`` ("backbone" / "new", or the parameter class) for logging.
        """
        if base_lr <= 0 or new_lr_mult <= 0 or weight_decay < 0:
            raise ValueError(
                "param_groups needs base_lr > 0, new_lr_mult > 0, weight_decay >= 0; "
                f"got {base_lr!r}, {new_lr_mult!r}, {weight_decay!r}"
            )
        if scheme == "reference_code":
            return reference_code_groups(self, base_lr, weight_decay)
        if scheme != "paper":
            raise ValueError(f"reid.lr_scheme={scheme!r} is not valid; choose one of 'paper', 'reference_code'")
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        new = [p for p in self.parameters() if id(p) not in backbone_ids]
        return [
            {"params": list(self.backbone.parameters()), "lr": base_lr, "weight_decay": weight_decay,
             "name": "backbone"},
            {"params": new, "lr": base_lr * new_lr_mult, "weight_decay": weight_decay, "name": "new"},
        ]


# The authors' MatConvNet multipliers (Huang-3/MpRL-for-person-re-ID@53c8808; docs/protocol.md "Learning rates"):
# parameter class -> (learning-rate multiplier, weight-decay multiplier), applied to the global rate 0.1 (x0.1 at
# epoch 40). The pretrained ones: code/get_net_structure/resnet52_iden_baseline.m:8-20 (even params 0.02, odd
# 0.001, conv1's filter 1e-4; weight decay 0 for names starting with "b", the BN parameters); the new FC:
# matlab/+dagnn/@DagNN/initParams.m:59-70 (0.01 / 0.2, its init x0.1 before a loss). The first of a
# ResNet's conv layers is "conv1"; MatConvNet's conv1 bias (0.02) has no counterpart in torchvision's ResNet.
REFERENCE_CODE_RATES: dict[str, tuple[float, float]] = {
    "conv": (0.02, 1.0), "conv1": (1e-4, 1.0), "bn_weight": (1e-3, 0.0), "bn_bias": (0.02, 0.0),
    "fc_weight": (0.01, 1.0), "fc_bias": (0.2, 1.0),
}
REFERENCE_CODE_BN_MOMENTUM = 1e-3  # MatConvNet's BN moments: a running average at rate 0.001 per step (cnn_train_dag)
REFERENCE_CODE_FC_INIT = 0.1  # a new conv before a loss: U(+-sqrt(3 / fan_in)) x 0.1 (initParams.m:19-20, 70)


def parameter_class(module: nn.Module, name: str, first_conv: nn.Module | None) -> str:
    """The MatConvNet class of ``module``'s parameter ``name`` (weight / bias): see REFERENCE_CODE_RATES."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"bn_{name}"
    if isinstance(module, nn.Linear):
        return f"fc_{name}"
    if module is first_conv and name == "weight":
        return "conv1"
    return "conv"


def reference_code_groups(model: nn.Module, base_lr: float, weight_decay: float) -> list[dict]:
    """One optimizer group per parameter class, at ``base_lr / 0.02`` (the global rate) x its multiplier."""
    global_lr = base_lr / REFERENCE_CODE_RATES["conv"][0]
    first_conv = next((m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)), None)
    params: dict[str, list[nn.Parameter]] = {k: [] for k in REFERENCE_CODE_RATES}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                raise ValueError(f"lr_scheme=reference_code has no class for a {type(module).__name__} parameter")
            params[parameter_class(module, name, first_conv)].append(p)
    return [{"params": ps, "lr": global_lr * REFERENCE_CODE_RATES[k][0],
             "weight_decay": weight_decay * REFERENCE_CODE_RATES[k][1], "name": k} for k, ps in params.items() if ps]


def reference_code_init_(model: nn.Module) -> None:
    """The reference code's new layers: each classifier (K-way, verification) ~ U(+-0.1 sqrt(3 / fan_in)), bias 0;
    every BatchNorm's running statistics move at rate 0.001 per step."""
    for fc in (getattr(model, "classifier", None), getattr(model, "verif_classifier", None)):
        if fc is not None:
            bound = REFERENCE_CODE_FC_INIT * (3.0 / fc.in_features) ** 0.5
            nn.init.uniform_(fc.weight, -bound, bound)
            nn.init.zeros_(fc.bias)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = REFERENCE_CODE_BN_MOMENTUM


class TwoStreamNet(IdentificationNet):
    """Siamese identification + verification net (Zheng et al. TOMM 2017; LSRO/MpRL two-stream baseline).

    Both images share the trunk, bottleneck and classifier; the verification head is
    (ê1 - ê2)^2 -> dropout(verif_dropout) -> Linear(D, 2) (class 1 = same identity), where ê = e / ||e||.

    The reference feeds raw pool5 features, but trains its verification FC weights at 1/100 of the new-layer
    rate on top of a pretrained trunk that barely moves (MatConvNet lr multipliers). Here the head and a
    fast-moving trunk share the new-layer rate, and raw squared differences (all >= 0, summing to hundreds,
    x10 after dropout 0.9) make the head's step and its gradient into the trunk grow with the embedding
    scale: the first SGD step overshoots and the loop diverges within an epoch. L2-normalising first bounds
    the input (sum_d (ê1 - ê2)^2 = 2 - 2 cos <= 4, the retrieval distance) and removes that feedback.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str = "resnet50",
        embed_dim: int | None = 512,
        dropout: float = 0.5,
        verif_dropout: float = 0.9,
        last_stride: int = 2,
    ) -> None:
        super().__init__(
            num_classes, backbone=backbone, embed_dim=embed_dim, dropout=dropout, last_stride=last_stride
        )
        _check_dropout("reid.verif_dropout", verif_dropout)
        self.verif_dropout = nn.Dropout(verif_dropout)
        self.verif_classifier = nn.Linear(self.embed_dim, 2)
        nn.init.normal_(self.verif_classifier.weight, std=0.001)
        nn.init.zeros_(self.verif_classifier.bias)

    def forward(  # type: ignore[override]
        self, x1: torch.Tensor, x2: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward(x1, x2)`` -> (logits1 [B, C], logits2 [B, C], verif_logits [B, 2]) in any mode;
        ``forward(x)`` -> logits in training mode, embedding [B, D] in eval mode (like IdentificationNet).
        """
        if x2 is None:
            return super().forward(x1)
        if x1.shape != x2.shape:
            raise ValueError(
                f"TwoStreamNet needs x1 and x2 of equal shape, got {tuple(x1.shape)} and {tuple(x2.shape)}"
            )
        # One trunk pass over both streams: [2B, 3, H, W] -> [2B, D].
        emb, logits = self.embed_and_classify(torch.cat([x1, x2], dim=0))
        e1, e2 = F.normalize(emb.float(), dim=1).chunk(2, dim=0)  # fp32: no bf16 cancellation in e1 - e2
        logits1, logits2 = logits.chunk(2, dim=0)
        verif_logits = self.verif_classifier(self.verif_dropout((e1 - e2).pow(2)))  # [B, 2]
        return logits1, logits2, verif_logits


def _verification_loss(
    verif_logits: torch.Tensor, same: torch.Tensor, verif_mask: torch.Tensor | None
) -> torch.Tensor:
    """CE summed over the pairs in ``verif_mask`` and divided by the WHOLE batch size B (the reference: MatConvNet
    sums the loss over the batch, label 0 = ignored, and divides every gradient by B). 0, still attached to the
    graph (zero gradients rather than None: keeps DDP happy), when no pair qualifies."""
    ce = F.cross_entropy(verif_logits.float(), same.long(), reduction="none")  # [B]
    if verif_mask is None:
        return ce.mean()
    mask = verif_mask.bool()
    if mask.shape != ce.shape:
        raise ValueError(f"verif_mask must have shape {tuple(ce.shape)}, got {tuple(mask.shape)}")
    return torch.where(mask, ce, torch.zeros_like(ce)).sum() / ce.shape[0]


def two_stream_loss(
    logits1: torch.Tensor,
    logits2: torch.Tensor,
    verif_logits: torch.Tensor,
    target1: torch.Tensor,
    target2: torch.Tensor,
    same: torch.Tensor,
    *,
    id_loss_fn: IdLossFn,
    id_weight: float = 0.5,
    verif_weight: float = 1.0,
    weights1: torch.Tensor | None = None,
    weights2: torch.Tensor | None = None,
    verif_mask: torch.Tensor | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """id_weight * (id1 + id2) + verif_weight * CE(verif_logits, same)   (LSRO/MpRL two-stream loss).

    ``id_loss_fn(logits, targets [B, C], weights [B] | None)`` is the caller's soft-target loss (e.g.
    ``labels.soft_cross_entropy``). ``same`` [B] is 1 for same-identity pairs. ``verif_mask`` [B] (bool)
    selects pairs where both images are real; only those enter the verification term, summed and divided by the
    whole batch size B as in the reference (None = all pairs, i.e. the mean).
    With ``return_parts`` also returns the detached components {"id1", "id2", "verif"}.
    """
    if verif_logits.shape != (same.shape[0], 2):
        raise ValueError(f"verif_logits must be [B, 2] with B={same.shape[0]}, got {tuple(verif_logits.shape)}")
    id1 = id_loss_fn(logits1, target1, weights1)
    id2 = id_loss_fn(logits2, target2, weights2)
    verif = _verification_loss(verif_logits, same, verif_mask)
    total = id_weight * id1 + id_weight * id2 + verif_weight * verif
    if return_parts:
        return total, {"id1": id1.detach(), "id2": id2.detach(), "verif": verif.detach()}
    return total


def build_reid_model(kind: str, num_classes: int, *, backbone: str, embed_dim: int | None, dropout: float,
                     last_stride: int = 2, verif_dropout: float = 0.9) -> IdentificationNet:
    """An ``ident`` (IdentificationNet) or ``twostream`` (TwoStreamNet) model, randomly initialised (the backbone's
    pretrained weights: ``trainables.reid.weights.init_backbone``)."""
    common = dict(backbone=backbone, embed_dim=embed_dim, dropout=dropout, last_stride=last_stride)
    if kind == "ident":
        return IdentificationNet(num_classes, **common)
    if kind == "twostream":
        return TwoStreamNet(num_classes, verif_dropout=verif_dropout, **common)
    raise ValueError(f"reid.model must be one of {list(MODEL_KINDS)}, got {kind!r}")
