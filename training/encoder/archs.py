"""Which backbones an encoder can be: sept's small ResNet, torchvision ResNets, any timm model,
an open_clip visual tower and a Hugging Face vision model.

``build_backbone`` makes one, randomly initialised, returning pooled features (no classifier);
``backbone_for_state_dict`` makes the one shaped to hold given weights. An arch is a name plus,
for imported families, its ``config`` (timm ``create_model`` keyword arguments, open_clip's
``model_cfg``, a Hugging Face ``config.json``) and its ``pool`` (``sept.training.encoder.pooling``),
both recorded in the encoder file, so a file rebuilds without any library's registry or the
network. Nothing here downloads.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from sept.errors import SeptError, first_line
from sept.training.encoder.pooling import check_pool, no_class_token

SMALL_RESNET_WIDTH = 16
"""Default base width of ``resnet18_small`` (64 is the standard CIFAR ResNet-18): 16 keeps a
32-px CPU training step near a quarter second; raise it for real runs on GPUs."""

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")
ARCHS = ("resnet18_small",) + TORCHVISION_ARCHS
TIMM_PREFIX = "timm/"
"""``timm/NAME``: any timm model, features pooled, no classifier (``sept.training.encoder.importer``)."""
OPEN_CLIP_PREFIX = "open_clip/"
"""``open_clip/NAME``: an open_clip model's visual tower (``sept.training.encoder.formats.open_clip_visual``)."""
HF_PREFIX = "hf/"
"""``hf/CLASS``: a Hugging Face vision model (``sept.training.encoder.formats.hf_folder``)."""
PREFIXES = (TIMM_PREFIX, OPEN_CLIP_PREFIX, HF_PREFIX)


def is_known_arch(arch: str) -> bool:
    return arch in ARCHS or (isinstance(arch, str) and any(arch.startswith(p) and len(arch) > len(p) for p in PREFIXES))


_TORCHVISION_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


class SmallResNet18(ResNet):
    """torchvision's ResNet-18 with a CIFAR-style stem (3x3 conv, stride 1, no max-pool) and a
    configurable base width; ``fc`` is the identity, so ``forward`` returns pooled features."""

    def __init__(self, width: int = SMALL_RESNET_WIDTH):
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes width 64 and the ImageNet stem
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64  # torchvision's BasicBlock only accepts its default base width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, width, 2)
        self.layer2 = self._make_layer(BasicBlock, 2 * width, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def build_backbone(
    arch: str, *, width: int | None = None, config: Mapping | None = None, pool: str | None = None
) -> tuple[nn.Module, int]:
    """A randomly initialised backbone returning pooled features, and the features' dimension.

    ``arch`` is ``resnet18_small`` (``width`` = base width, default ``SMALL_RESNET_WIDTH``), a
    torchvision ``resnet18``/``resnet34``/``resnet50`` (``fc`` replaced by the identity),
    ``timm/NAME`` (``config``: ``create_model`` keyword arguments), ``open_clip/NAME`` or
    ``hf/CLASS`` (``config``: the model's own config). ``pool`` picks the features (``pooling``).
    """
    pool = check_pool(pool)
    if arch.startswith(OPEN_CLIP_PREFIX):
        from sept.training.encoder.formats.open_clip_visual import build_visual

        return build_visual(_required(arch, config), pool)
    if arch.startswith(HF_PREFIX):
        from sept.training.encoder.formats.hf_folder import build_hf_backbone

        return build_hf_backbone(arch[len(HF_PREFIX) :], _required(arch, config), pool)
    if config and not arch.startswith(TIMM_PREFIX):
        raise SeptError(f"{arch} takes no architecture config")
    if pool == "cls" and not arch.startswith(TIMM_PREFIX):
        raise no_class_token(arch)  # a ResNet's default pool already is the mean over positions
    if arch == "resnet18_small":
        width = SMALL_RESNET_WIDTH if width is None else int(width)
        if width < 1:
            raise SeptError(f"resnet18_small width must be positive, got {width}")
        return SmallResNet18(width), 8 * width
    if arch in TORCHVISION_ARCHS:
        if width is not None:
            raise SeptError(f"width applies to resnet18_small only, not to {arch}")
        model = getattr(torchvision.models, arch)(weights=None)
        model.fc = nn.Identity()
        return model, _TORCHVISION_DIMS[arch]
    if arch.startswith(TIMM_PREFIX):
        if width is not None:
            raise SeptError(f"width applies to resnet18_small only, not to {arch}")
        return _timm_backbone(arch[len(TIMM_PREFIX) :], dict(config or {}), pool)
    raise SeptError(f"unknown encoder arch {arch!r} (choose from {', '.join(ARCHS)}, or timm/NAME)")


def _required(arch: str, config: Mapping | None) -> Mapping:
    if not config:
        raise SeptError(f"encoder arch {arch} needs the model's config, which its import records")
    return config


# sept's pool -> timm's global_pool: token = the class token, avg = the mean of the tokens after
# the prefix (class and register) tokens, both after the final norm.
_TIMM_POOL = {"cls": "token", "mean": "avg"}


def _timm_backbone(name: str, kwargs: dict, pool: str) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError:
        raise SeptError(f"encoder arch timm/{name} needs timm: pip install 'sept[timm]'") from None
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:
        raise SeptError(f"unknown timm model {name!r}: {first_line(err)}") from None
    except TypeError as err:  # a keyword argument the model's constructor does not take
        raise SeptError(f"timm model {name!r} does not take {kwargs}: {first_line(err)}") from None
    if pool != "default":
        if pool == "cls" and getattr(model, "cls_token", None) is None:
            raise no_class_token(f"timm/{name}")
        model.reset_classifier(0, global_pool=_TIMM_POOL[pool])
    return model, int(model.num_features)


def backbone_for_state_dict(
    arch: str, state_dict: Mapping[str, torch.Tensor], *, config: Mapping | None = None, pool: str | None = None
) -> tuple[nn.Module, int]:
    """Builds ``arch`` shaped to hold ``state_dict`` (the small ResNet's width is read off its stem)."""
    width = None
    if arch == "resnet18_small":
        stem = state_dict.get("conv1.weight")
        if not isinstance(stem, torch.Tensor) or stem.ndim != 4:
            raise ValueError("state dict has no conv1.weight")
        width = int(stem.shape[0])
    return build_backbone(arch, width=width, config=config, pool=pool)


def unwrap(module: nn.Module) -> nn.Module:
    # DistributedDataParallel (and torch.compile) keep the real module one level down.
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return getattr(module, "_orig_mod", module)
