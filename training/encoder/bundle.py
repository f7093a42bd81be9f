"""The encoder checkpoint contract shared by every stage: build, save, load and run a backbone.

An encoder file is ``{"sept_encoder": {"arch", "image_size", "mean", "std", "dim", "state_dict",
"extra"}}`` written by ``save_encoder``; ``arch`` is sept's small ResNet, a torchvision ResNet,
``timm/NAME`` (any timm model, when timm is installed), ``open_clip/NAME`` or ``hf/CLASS``
(``sept.training.encoder.archs``). An imported encoder also records ``resize_size`` and
``interpolation`` (how images are resized before the crop), ``pool`` (which features,
``sept.training.encoder.pooling``) and ``arch_config`` (what rebuilds the architecture); a file
without them resizes to ``image_size`` bilinearly and pools by default, as files always did. ``load_encoder`` also accepts a plain
torchvision ResNet state dict (its arch found by strict loading, its ``fc`` head dropped); other
state dicts are wrapped once by ``sept import-encoder`` (``sept.training.encoder.importer``). Loading always uses
``torch.load(weights_only=True)``: an encoder file never runs code.

``EncoderBundle`` is what the embed, select and evaluate stages hold: the backbone, how to
preprocess an image for it, and ``embed``, which returns L2-normalised float32 features.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sept.errors import SeptError, first_line
from sept.io import atomic_torch_save
from sept.training.encoder.archs import ARCHS, TORCHVISION_ARCHS, backbone_for_state_dict, is_known_arch, unwrap
from sept.training.encoder.identity import weights_identity
from sept.training.encoder.pooling import check_pool
from sept.training.encoder.preprocess import (
    DEFAULT_INTERPOLATION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHVISION_IMAGE_SIZE,
    eval_transform,
)

log = logging.getLogger(__name__)

CONTRACT_KEYS = ("arch", "image_size", "mean", "std", "dim", "state_dict")
RECIPE_KEYS = ("resize_size", "interpolation", "pool", "arch_config")
"""Optional fields an imported encoder records (module docstring)."""


def save_encoder(
    path: str,
    backbone: nn.Module,
    *,
    arch: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    extra: dict | None = None,
    center: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    resize_size: int | None = None,
    interpolation: str | None = None,
    pool: str | None = None,
    arch_config: Mapping | None = None,
    dim: int | None = None,
) -> str:
    """Writes ``backbone`` (weights on CPU) and how to preprocess for it to ``path`` atomically.

    ``extra`` is free-form provenance (method, steps, data...) and must be JSON-serialisable, so
    that the file stays loadable with ``weights_only=True``. ``center`` (dim values, optional) is
    the mean L2-normalised feature of the images the encoder will search among: ``embed``
    subtracts it and normalises again (see ``EncoderBundle.embed``). ``resize_size``,
    ``interpolation``, ``pool`` and ``arch_config`` are an imported encoder's (module docstring);
    ``arch_config`` must be JSON-serialisable like ``extra``. ``dim``: the features' dimension,
    when the caller built the backbone and knows it (else the arch is built again to learn it).
    Returns ``path``.
    """
    if not is_known_arch(arch):
        raise SeptError(f"unknown encoder arch {arch!r} (choose from {', '.join(ARCHS)}, or timm/NAME)")
    extra = _json_copy(extra or {}, "extra")
    recipe = _recipe(
        int(image_size),
        resize_size=resize_size,
        interpolation=interpolation,
        pool=pool,
        arch_config=_json_copy(arch_config, "arch_config") if arch_config is not None else None,
    )
    mean, std = [float(x) for x in mean], [float(x) for x in std]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std must have 3 values (RGB)")
    state_dict = {k: v.detach().to("cpu").clone() for k, v in unwrap(backbone).state_dict().items()}
    if dim is None:
        _, dim = backbone_for_state_dict(arch, state_dict, config=recipe.get("arch_config"), pool=recipe.get("pool"))
    center_tensor = _center_tensor(center, dim)
    payload = {
        "sept_encoder": {
            "arch": arch,
            "image_size": int(image_size),
            "mean": mean,
            "std": std,
            "dim": int(dim),
            "state_dict": state_dict,
            "extra": extra,
            **recipe,
        }
    }
    if center_tensor is not None:
        payload["sept_encoder"]["center"] = center_tensor
    atomic_torch_save(payload, path)
    log.info("saved %s encoder (dim %d, %d px) to %s", arch, dim, image_size, path)
    return path


def _json_copy(obj: Any, name: str) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as err:
        raise ValueError(f"encoder {name} must be JSON-serialisable: {err}") from None


def _recipe(image_size: int, **fields: Any) -> dict:
    """The set ones of an imported encoder's fields, the defaults left out: a file resizing to
    its crop bilinearly reads, and hashes, as one written before these fields existed."""
    if fields.get("resize_size") is not None:
        fields["resize_size"] = int(fields["resize_size"])
        if fields["resize_size"] < image_size:
            raise ValueError(f"resize_size {fields['resize_size']} is smaller than the crop, image_size {image_size}")
        if fields["resize_size"] == image_size:
            fields["resize_size"] = None
    if fields.get("interpolation") == DEFAULT_INTERPOLATION:
        fields["interpolation"] = None
    if fields.get("pool") is not None:
        fields["pool"] = check_pool(fields["pool"])
    return {k: v for k, v in fields.items() if v is not None}


def _center_tensor(center: Sequence[float] | np.ndarray | torch.Tensor | None, dim: int) -> torch.Tensor | None:
    if center is None:
        return None
    tensor = torch.as_tensor(np.asarray(center, dtype=np.float32)).reshape(-1).clone()
    if tensor.numel() != dim:
        raise ValueError(f"center has {tensor.numel()} values but the encoder gives {dim}-d features")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("center holds non-finite values")
    return tensor


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class EncoderBundle:
    """A loaded encoder: the backbone in eval mode on ``device`` and how to feed it."""

    model: nn.Module
    arch: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    identity: str
    device: torch.device
    extra: dict = field(default_factory=dict)
    center: torch.Tensor | None = None
    """Mean normalised feature subtracted by ``embed`` (None: no centring)."""
    resize_size: int | None = None
    """The shorter side before the centre crop (None: ``image_size``)."""
    interpolation: str = DEFAULT_INTERPOLATION
    pool: str | None = None
    arch_config: dict | None = None

    def __post_init__(self) -> None:
        self._transform = eval_transform(
            self.image_size, self.mean, self.std, resize_size=self.resize_size, interpolation=self.interpolation
        )

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """One image as the model's input: RGB, shorter side resized to ``resize_size``
        (``image_size`` unless recorded), centre crop, normalised; a float32 tensor
        [3, image_size, image_size]."""
        return self._transform(img.convert("RGB"))

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """L2-normalised features (B, dim) float32 of a preprocessed batch [B, 3, H, W].

        With a ``center``, the normalised features minus the centre, normalised again: a small
        network's features share one large common direction (cosines of 0.99 between unrelated
        images), and cosine similarity after removing it ranks by what tells images apart.
        On CUDA the model runs channels-last under bfloat16 autocast; on CPU in float32.
        """
        self.model.eval()
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                    features = self.model(x)
            else:
                features = self.model(x.float())
            features = F.normalize(features.float(), dim=1)
            if self.center is not None:
                features = F.normalize(features - self.center.to(features.device), dim=1)
        return features.cpu().numpy().astype(np.float32, copy=False)

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 256) -> np.ndarray:
        """``embed`` over PIL images, ``batch_size`` at a time; (len(images), dim) float32."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            out[start : start + len(chunk)] = self.embed(torch.stack([self.preprocess(im) for im in chunk]))
        return out


def _bundle(
    state_dict: Mapping[str, torch.Tensor],
    *,
    arch: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device,
    extra: dict,
    center: Any = None,
    recipe: Mapping | None = None,
) -> EncoderBundle:
    recipe = dict(recipe or {})
    model, dim = backbone_for_state_dict(arch, state_dict, config=recipe.get("arch_config"), pool=recipe.get("pool"))
    model.load_state_dict(state_dict, strict=True)
    center = _center_tensor(center, dim)
    identity = weights_identity(
        state_dict, arch=arch, image_size=image_size, mean=mean, std=std, center=center, **recipe
    )
    dev = _resolve_device(device)
    model = model.to(dev).eval()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return EncoderBundle(
        model=model,
        arch=arch,
        image_size=int(image_size),
        mean=tuple(float(x) for x in mean),
        std=tuple(float(x) for x in std),
        dim=int(dim),
        identity=identity,
        device=dev,
        extra=dict(extra),
        center=center.to(dev) if center is not None else None,
        resize_size=recipe.get("resize_size"),
        interpolation=recipe.get("interpolation") or DEFAULT_INTERPOLATION,
        pool=recipe.get("pool"),
        arch_config=recipe.get("arch_config"),
    )


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def load_encoder(path: str, device: str | torch.device = "auto") -> EncoderBundle:
    """Loads a sept encoder file or a plain torchvision ResNet state dict (224 px, ImageNet mean/std).

    ``device`` is ``"auto"`` (CUDA when present), or any torch device. Raises ``SeptError``
    ``"not an encoder checkpoint: PATH (...)"`` for a file that is neither.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SeptError(f"encoder checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as err:
        reason = first_line(err)
        raise SeptError(f"not an encoder checkpoint: {path} (unreadable by torch.load: {reason})") from None

    if isinstance(obj, Mapping) and "sept_encoder" in obj:
        meta = obj["sept_encoder"]
        missing = [k for k in CONTRACT_KEYS if not isinstance(meta, Mapping) or k not in meta]
        if missing:
            raise SeptError(f"not an encoder checkpoint: {path} (sept_encoder lacks {', '.join(missing)})")
        if not is_known_arch(meta["arch"]):
            raise SeptError(f"not an encoder checkpoint: {path} (unknown arch {meta['arch']!r})")
        try:
            bundle = _bundle(
                meta["state_dict"],
                arch=meta["arch"],
                image_size=meta["image_size"],
                mean=meta["mean"],
                std=meta["std"],
                device=device,
                extra=meta.get("extra") or {},
                center=meta.get("center"),
                recipe={k: meta[k] for k in RECIPE_KEYS if meta.get(k) is not None},
            )
        except (RuntimeError, ValueError) as err:
            reason = first_line(err)
            raise SeptError(
                f"not an encoder checkpoint: {path} (weights do not fit {meta['arch']}: {reason})"
            ) from None
        if bundle.dim != meta["dim"]:
            raise SeptError(
                f"not an encoder checkpoint: {path} (dim {meta['dim']} but {meta['arch']} gives {bundle.dim})"
            )
        return bundle

    if _is_tensor_dict(obj):
        state_dict = {k: v for k, v in obj.items() if not k.startswith("fc.")}
        for arch in TORCHVISION_ARCHS:
            try:
                bundle = _bundle(
                    state_dict,
                    arch=arch,
                    image_size=TORCHVISION_IMAGE_SIZE,
                    mean=IMAGENET_MEAN,
                    std=IMAGENET_STD,
                    device=device,
                    extra={"source": "torchvision state dict"},
                )
            except RuntimeError:  # strict load failed: missing/unexpected keys or shape mismatch
                continue
            log.info("loaded %s as a plain torchvision %s state dict", path, arch)
            return bundle
        raise SeptError(
            f"not an encoder checkpoint: {path} (a state dict that fits none of {', '.join(TORCHVISION_ARCHS)})"
        )

    raise SeptError(f"not an encoder checkpoint: {path} (holds {type(obj).__name__}, no sept_encoder entry)")
