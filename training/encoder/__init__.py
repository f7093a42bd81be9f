"""The encoder's one home: what an encoder file is, how it is made, identified, fed and loaded.

Every stage that turns an image into a vector depends on this contract (embed, select, evaluate,
training), so it lives in one package, a module per idea:

- ``archs``: which backbones an encoder can be (sept's small ResNet, torchvision, timm, an
  open_clip visual tower, a Hugging Face vision model);
- ``pooling``: which features it returns (``--pool default|cls|mean``);
- ``preprocess``: how an image is fed to one (the evaluation transform, the recipe an import
  records, ImageNet defaults);
- ``identity``: the hash that says two encoders embed alike, and the check that stores agree;
- ``bundle``: the encoder file (``save_encoder``, ``load_encoder``) and ``EncoderBundle``;
- ``importer``: a checkpoint from elsewhere made an encoder file, reading its weights through
  ``weights_file`` (never running a pickle's code), renaming keys through ``key_map``, and each
  format beyond a state dict through ``formats`` (DINOv2 releases, open_clip, Hugging Face folders).

It sits under ``training/`` because the layout keeps four code folders and an encoder is a model;
embed (``sept.cluster``) and select read it from here.
"""

from sept.training.encoder.archs import (
    ARCHS,
    SMALL_RESNET_WIDTH,
    TIMM_PREFIX,
    TORCHVISION_ARCHS,
    SmallResNet18,
    build_backbone,
    is_known_arch,
)
from sept.training.encoder.bundle import EncoderBundle, load_encoder, save_encoder
from sept.training.encoder.identity import require_same_encoder, weights_identity
from sept.training.encoder.preprocess import IMAGENET_MEAN, IMAGENET_STD, eval_transform

__all__ = [
    "ARCHS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SMALL_RESNET_WIDTH",
    "TIMM_PREFIX",
    "TORCHVISION_ARCHS",
    "EncoderBundle",
    "SmallResNet18",
    "build_backbone",
    "eval_transform",
    "is_known_arch",
    "load_encoder",
    "require_same_encoder",
    "save_encoder",
    "weights_identity",
]
