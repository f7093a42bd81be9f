"""Which features an encoder returns: ``--pool default|cls|mean``, one meaning across families.

- ``default``: what the model gives without its classifier, as its library builds it (timm's
  ``global_pool``, open_clip's visual tower output with its projection, a Hugging Face model's
  ``pooler_output`` or, for ``ViTModel``, whose pooler is a separately trained layer most
  checkpoints lack, its class token);
- ``cls``: the class token after the model's final norm (open_clip: through its projection);
- ``mean``: the mean of the patch tokens after the final norm, class and register tokens left
  out (a CNN's global average pool).

Each family applies it with its library's own switch (timm ``reset_classifier(0, global_pool)``,
open_clip's ``pool_type``, the Hugging Face model's outputs); ``None`` is an encoder that
predates pooling choices and is read as ``default``.
"""

from __future__ import annotations

from sept.errors import SeptError

POOLS = ("default", "cls", "mean")
DEFAULT_POOL = "default"


def check_pool(pool: str | None) -> str:
    """``pool`` if it is one of ``POOLS`` (``None`` reads as ``default``); raises ``SeptError``."""
    pool = DEFAULT_POOL if pool is None else pool
    if pool not in POOLS:
        raise SeptError(f"unknown pool {pool!r} (choose from {', '.join(POOLS)})")
    return pool


def no_class_token(arch: str) -> SeptError:
    return SeptError(f"--pool cls needs a class token, and {arch} has none; use --pool mean or default")
