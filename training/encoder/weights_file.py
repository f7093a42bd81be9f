"""Reading a weights file without running its code: safetensors, or ``torch.load(weights_only=True)``.

Every checkpoint sept imports is read here or, for a Hugging Face folder, by ``transformers``
under the same rule; a pickle that would build anything other than tensors and containers is
refused with ``refused_pickle``'s one line, never with torch's advice to load it unsafely.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch

from sept.errors import SeptError, first_line


def refused_pickle(path: str, err: BaseException) -> SeptError:
    """The error for a pickle ``torch.load(weights_only=True)`` rejected: damaged, or naming code."""
    if "GLOBAL" not in str(err):  # not a class or function the pickle names: a damaged file
        return SeptError(f"cannot read weights {path}: {first_line(err)}")
    # torch's own message suggests weights_only=False, which would run the file's code.
    return SeptError(
        f"{path} is refused: unpickling it would build objects other than tensors (and could run code); "
        "save its state dict alone, or as .safetensors"
    )


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or torch file (a ``state_dict`` or ``model`` entry holding
    them is unwrapped); raises ``SeptError`` naming the file."""
    if not os.path.isfile(path):
        raise SeptError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise refused_pickle(path, err) from None
    except Exception as err:  # noqa: BLE001 - any reader failure is the same user error
        raise SeptError(f"cannot read weights {path}: {first_line(err)}") from None
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
