"""A Hugging Face model folder (``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``)
as a sept backbone, through ``transformers`` (``pip install 'sept[hf]'``).

The folder's ``model_type`` picks the model class (``MODEL_CLASSES``; ``--arch hf/CLASS`` picks
one by name): a checkpoint saved with a head (``ViTForImageClassification``) or a whole
``CLIPModel`` loads into the backbone class, and ``from_pretrained`` itself strips the base
model's prefix and leaves the head or the text tower out, both listed as dropped keys. Loading is
local only, ``weights_only=True`` for ``.bin`` files, no remote code, float32; a backbone weight
the folder lacks (which ``from_pretrained`` would only warn about, initialising it at random) is
refused.

``HFFeatures`` wraps the model so that ``forward`` returns one vector per image, as ``--pool``
chooses (``sept.training.encoder.pooling``). The preprocessing is ``preprocessor_config.json``'s,
read through ``transformers.AutoImageProcessor`` (class defaults filled in): the shorter side
resized (``size``, ConvNeXt's ``crop_pct`` rule), centre crop (``crop_size``), ``resample``,
``image_mean`` and ``image_std``. A processor that resizes to a fixed height and width (ViT's) is
read as a resize of the shorter side and a centre crop, the same for square images. Without the
file, ``config.json``'s ``image_size`` with ImageNet's mean and std.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
from collections.abc import Mapping

import torch
from torch import nn

from sept.errors import SeptError, first_line
from sept.training.encoder.pooling import no_class_token
from sept.training.encoder.preprocess import Preprocessing
from sept.training.encoder.weights_file import refused_pickle

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"  # read with weights_only=True; model.safetensors is preferred
MODEL_CLASSES = {  # config.json's model_type -> the backbone class that loads it
    "vit": "ViTModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "clip_vision_model": "CLIPVisionModel",
    "clip": "CLIPVisionModel",  # a whole CLIPModel folder: its vision tower
    "convnext": "ConvNextModel",
}
# How each class's features are taken: whether it has tokens (a class token first, then
# registers, then patches) and whether its default output is pooler_output (its normed class
# token, or a CNN's normed global average) rather than the class token itself.
_TOKENS = {"ViTModel", "Dinov2Model", "Dinov2WithRegistersModel", "CLIPVisionModel"}
_POOLER_DEFAULT = {"Dinov2Model", "Dinov2WithRegistersModel", "CLIPVisionModel", "ConvNextModel"}
_CONSTRUCTOR_KWARGS = {"ViTModel": {"add_pooling_layer": False}}  # ViT's pooler: a trained layer most lack
# Where a config records the folder it was read from and the library that wrote it: neither
# changes the model, and an encoder's identity must not depend on them.
_CONFIG_PROVENANCE = ("_name_or_path", "transformers_version")
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as processors store them


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SeptError("Hugging Face model folders need transformers: pip install 'sept[hf]'") from None
    return transformers


@contextlib.contextmanager
def _quiet():
    """transformers' load report and progress bars off: sept names the keys it left out itself."""
    hf_logging = _transformers().utils.logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def _model_class(name: str):
    if name not in set(MODEL_CLASSES.values()):
        raise SeptError(
            f"hf/{name} is not a supported model class (choose from {', '.join(sorted(_TOKENS))}, ConvNextModel)"
        )
    return getattr(_transformers(), name)


class HFFeatures(nn.Module):
    """A Hugging Face vision model returning one feature vector per image, pooled as ``pool`` says."""

    def __init__(self, model: nn.Module, class_name: str, pool: str):
        super().__init__()
        if pool == "cls" and class_name not in _TOKENS:
            raise no_class_token(f"hf/{class_name}")
        self.model = model
        self.pool = pool
        self.tokens = class_name in _TOKENS
        self.pooler_default = class_name in _POOLER_DEFAULT
        self.prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        # CLIP's last_hidden_state precedes its final norm, which it applies to the class token only.
        self.norm_tokens = class_name == "CLIPVisionModel"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        if not self.tokens or (self.pool == "default" and self.pooler_default):
            return out.pooler_output  # a CNN's mean and default alike: its own normed global average
        hidden = out.last_hidden_state
        if self.norm_tokens:  # transformers 5 holds it on the model, earlier versions on its vision_model
            hidden = getattr(self.model, "vision_model", self.model).post_layernorm(hidden)
        return hidden[:, self.prefix_tokens :].mean(dim=1) if self.pool == "mean" else hidden[:, 0]


def _feature_dim(config) -> int:
    sizes = getattr(config, "hidden_sizes", None)
    return int(sizes[-1]) if sizes else int(config.hidden_size)


def build_hf_backbone(class_name: str, config: Mapping, pool: str) -> tuple[nn.Module, int]:
    """``class_name`` built from its recorded ``config`` dict, randomly initialised and wrapped."""
    cls = _model_class(class_name)
    model = cls(cls.config_class.from_dict(dict(config)), **_CONSTRUCTOR_KWARGS.get(class_name, {}))
    return HFFeatures(model, class_name, pool), _feature_dim(model.config)


def load_folder(path: str, class_name: str | None, pool: str) -> tuple[HFFeatures, str, dict, int, list[str]]:
    """The folder's model, loaded and wrapped; its class name, config (for ``build_hf_backbone``),
    feature dimension and the checkpoint keys it left out."""
    transformers = _transformers()
    if class_name is None:
        with _quiet():
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        class_name = MODEL_CLASSES.get(config.model_type)
        if class_name is None:
            raise SeptError(
                f"{path}: model_type {config.model_type!r} is not one sept imports "
                f"({', '.join(sorted(MODEL_CLASSES))}); a timm or torchvision model's weights import with --arch"
            )
    cls = _model_class(class_name)
    try:
        with _quiet():
            model, info = cls.from_pretrained(
                path,
                local_files_only=True,
                trust_remote_code=False,
                weights_only=True,
                dtype=torch.float32,
                output_loading_info=True,
                **_CONSTRUCTOR_KWARGS.get(class_name, {}),
            )
    except pickle.UnpicklingError as err:
        weights = os.path.join(path, PICKLE_WEIGHTS_NAME)
        raise refused_pickle(weights if os.path.isfile(weights) else path, err) from None
    except (OSError, ValueError, RuntimeError) as err:
        raise SeptError(f"cannot load Hugging Face folder {path}: {first_line(err)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise SeptError(
            f"{path} does not fit hf/{class_name}: {len(missing)} of its weights are missing (first: {missing[0]})"
        )
    config = json.loads(model.config.to_json_string(use_diff=False))
    for key in _CONFIG_PROVENANCE:
        config.pop(key, None)
    return (
        HFFeatures(model.eval(), class_name, pool),
        class_name,
        config,
        _feature_dim(model.config),
        sorted(info.get("unexpected_keys") or []),
    )


def preprocessing(path: str, config: Mapping) -> Preprocessing:
    """The folder's ``preprocessor_config.json`` as sept's preprocessing (module docstring)."""
    if not os.path.isfile(os.path.join(path, PREPROCESSOR_NAME)):
        return Preprocessing(
            image_size=int(config.get("image_size") or 224),
            source=f"config.json image_size, ImageNet mean/std (no {PREPROCESSOR_NAME})",
        )
    with _quiet():
        proc = _transformers().AutoImageProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    size, crop = getattr(proc, "size", None) or {}, getattr(proc, "crop_size", None) or {}
    shortest = _get(size, "shortest_edge")
    notes = [PREPROCESSOR_NAME]
    if shortest:
        resize = image = int(shortest)
        crop_pct = getattr(proc, "crop_pct", None)
        if getattr(proc, "do_center_crop", False) and _get(crop, "height"):
            image = int(_get(crop, "height"))
        elif crop_pct and shortest < 384:  # ConvNeXt's processor: resize to edge / crop_pct, crop the edge
            resize = int(shortest / crop_pct)
    elif _get(size, "height"):
        resize = image = int(_get(size, "height"))
        notes.append("its fixed-size resize read as shorter side and crop")
    else:
        raise SeptError(f"{os.path.join(path, PREPROCESSOR_NAME)}: no size sept can read ({size})")
    resample = getattr(proc, "resample", 2)
    interpolation = _RESAMPLE.get(int(resample), "bicubic") if resample is not None else "bilinear"
    if resample is not None and int(resample) not in _RESAMPLE:
        notes.append(f"PIL resample {int(resample)} read as bicubic")
    normalize = getattr(proc, "do_normalize", True)
    return Preprocessing(
        image_size=image,
        resize_size=resize,
        interpolation=interpolation,
        mean=tuple(float(x) for x in proc.image_mean) if normalize else (0.0, 0.0, 0.0),
        std=tuple(float(x) for x in proc.image_std) if normalize else (1.0, 1.0, 1.0),
        source="; ".join(notes),
    )


def _get(size, key: str):
    # processors hold sizes as dicts or as transformers' SizeDict, whose unset fields are None
    return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
