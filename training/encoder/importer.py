"""Bringing your own checkpoint: a timm or torchvision ResNet state dict becomes a sept encoder file.

A sept encoder file names its architecture (``sept.training.encoder.archs``). ``timm/NAME`` is any
timm model, built by ``timm.create_model(NAME, pretrained=False, num_classes=0)`` (pooled
features, no classifier) and filled from local weights only: nothing is ever downloaded.

``import_encoder`` is the adapter for a state dict from anywhere (a timm or Hugging Face
``.safetensors`` file, a training checkpoint's ``.pth``):

1. read it (``safetensors`` or ``torch.load(weights_only=True)``; a ``state_dict`` or ``model``
   entry holding the tensors is unwrapped);
2. strip a key prefix that wrappers add (``module.``, ``model.``, ``backbone.``, ``encoder.``);
3. load it into the backbone: every backbone weight must be present, and the keys the backbone
   does not have (the classifier head) are dropped and listed in the file's provenance;
4. write the sept encoder with the preprocessing timm records for the model (input size, mean,
   std), or the caller's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch

from sept.errors import SeptError, first_line
from sept.training.encoder.archs import build_backbone
from sept.training.encoder.bundle import save_encoder
from sept.training.encoder.preprocess import default_preprocessing

log = logging.getLogger(__name__)

DEFAULT_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or torch file; raises ``SeptError`` naming the file."""
    if not os.path.isfile(path):
        raise SeptError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is the same user error
        reason = first_line(err)
        raise SeptError(f"cannot read weights {path}: {reason}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    tensors = (
        {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if isinstance(obj, Mapping)
        else {}
    )
    if not tensors:
        raise SeptError(f"{path} holds no state dict (no name -> tensor mapping)")
    return tensors


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Removes the first of ``prefixes`` that every key starts with, repeatedly (``module.model.x`` -> ``x``)."""
    out = dict(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if out and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def import_encoder(
    weights: str,
    arch: str,
    out: str,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
) -> str:
    """Writes the sept encoder file ``out`` from the state dict ``weights`` for ``arch``; returns ``out``."""
    state_dict = strip_prefixes(read_state_dict(weights), prefixes)
    model, _ = build_backbone(arch)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shapes differ: another architecture or width
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "shapes differ")
        raise SeptError(f"{weights} does not fit {arch}: {detail}; check --arch") from None
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:3])
        raise SeptError(
            f"{weights} does not fit {arch}: {len(result.missing_keys)} of its weights are missing "
            f"(first: {shown}); check --arch and --strip-prefix"
        )
    dropped = sorted(result.unexpected_keys)
    if dropped:
        log.info(
            "import: dropped %d keys the backbone has no place for (the classifier): %s",
            len(dropped),
            ", ".join(dropped[:6]),
        )
    size, default_mean, default_std = default_preprocessing(arch, model)
    return save_encoder(
        out,
        model,
        arch=arch,
        image_size=image_size or size,
        mean=mean or default_mean,
        std=std or default_std,
        extra=dict(source=os.path.abspath(weights), imported=True, dropped_keys=dropped),
    )
