"""Bringing your own checkpoint: a timm or torchvision ResNet state dict becomes a sept encoder file.

A sept encoder file names its architecture (``sept.training.encoder.archs``). ``timm/NAME`` is any
timm model, built by ``timm.create_model(NAME, pretrained=False, num_classes=0)`` (pooled
features, no classifier) and filled from local weights only: nothing is ever downloaded.

``import_encoder`` is the adapter for a state dict from anywhere (a timm or Hugging Face
``.safetensors`` file, a training checkpoint's ``.pth``):

1. read it (``safetensors`` or ``torch.load(weights_only=True)``; a ``state_dict`` or ``model``
   entry holding the tensors is unwrapped);
2. strip a key prefix that wrappers add (``module.``, ``model.``, ``backbone.``, ``encoder.``),
   then rename keys by the ``--key-map`` file, if one is given;
3. load it into the backbone: every backbone weight must be present with its shape
   (``key_map.check_fit``), and the keys the backbone does not have (the classifier head) are
   dropped and listed in the file's provenance;
4. write the sept encoder with the preprocessing timm records for the model (input size, mean,
   std), or the caller's.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping, Sequence

import torch

from sept.errors import SeptError, first_line
from sept.training.encoder.archs import build_backbone
from sept.training.encoder.bundle import save_encoder
from sept.training.encoder.key_map import apply_key_map, check_fit, read_key_map
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
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a class or function the pickle names: a damaged file
            raise SeptError(f"cannot read weights {path}: {first_line(err)}") from None
        # torch's own message suggests weights_only=False, which would run the file's code.
        raise SeptError(
            f"{path} is refused: unpickling it would build objects other than tensors (and could run code); "
            "save its state dict alone, or as .safetensors"
        ) from None
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
    key_map: str | None = None,
) -> str:
    """Writes the sept encoder file ``out`` from the state dict ``weights`` for ``arch``; returns ``out``.

    ``key_map``: a YAML file of ordered regex renames for a checkpoint with its own key names
    (``sept.training.encoder.key_map``)."""
    state_dict = strip_prefixes(read_state_dict(weights), prefixes)
    if key_map is not None:
        state_dict = apply_key_map(state_dict, read_key_map(key_map))
    model, _ = build_backbone(arch)
    dropped = check_fit(state_dict, model.state_dict(), source=weights, arch=arch)
    model.load_state_dict(state_dict, strict=False)  # check_fit: only the dropped keys are extra
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
        extra=dict(
            source=os.path.abspath(weights),
            imported=True,
            dropped_keys=dropped,
            key_map=os.path.abspath(key_map) if key_map else None,
        ),
    )
