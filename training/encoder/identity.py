"""An encoder's identity: the hash that says two encoders embed alike, and the check that stores agree.

Embedding and index stores record the identity of the encoder that made them; a stage that
compares features from two places (query embeddings against an index) refuses to mix identities.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import torch

from sept.errors import SeptError


def weights_identity(
    state_dict: Mapping[str, torch.Tensor],
    *,
    arch: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    center: torch.Tensor | None = None,
    resize_size: int | None = None,
    interpolation: str | None = None,
    pool: str | None = None,
    arch_config: Mapping | None = None,
) -> str:
    """First 16 hex chars of a sha256 over the weights (names, dtypes, shapes, bytes), the
    preprocessing and the feature centre, if any: the same weights fed differently-sized or
    -normalised images, or centred differently, embed differently. Without a centre the identity
    is what it was before centres existed.

    An imported encoder also records how images are resized (``resize_size``, ``interpolation``),
    which features it pools (``pool``: the same weights give other vectors with another pooling)
    and the architecture's settings (``arch_config``: a head count changes the features, not the
    weights' shapes); each is hashed only when set, so older encoders keep their identity."""
    h = hashlib.sha256()
    h.update(json.dumps([arch, int(image_size), [float(x) for x in mean], [float(x) for x in std]]).encode())
    recipe = dict(resize_size=resize_size, interpolation=interpolation, pool=pool, arch_config=arch_config)
    recipe = {k: v for k, v in recipe.items() if v is not None}
    if recipe:
        h.update(b"recipe|" + json.dumps(recipe, sort_keys=True).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    if center is not None:
        h.update(b"center|")
        h.update(center.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy().tobytes())
    return h.hexdigest()[:16]


def require_same_encoder(
    index_attrs: dict, *, identity: str, arch: str, dim: int, source: str, index_path: str
) -> None:
    """Refuse vectors from another encoder than the index's: their similarities mean nothing.

    ``source`` names where the vectors come from ("embeddings PATH", "queries embedded by PATH").
    """
    theirs = index_attrs["encoder"]
    if identity != theirs["identity"] or int(dim) != int(index_attrs["dim"]):
        raise SeptError(
            f"{source} come from encoder {identity} ({arch}, {dim}-d), but index {index_path} was built from "
            f"encoder {theirs['identity']} ({theirs['arch']}, {index_attrs['dim']}-d)"
        )
