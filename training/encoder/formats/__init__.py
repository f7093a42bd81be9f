"""Checkpoint formats ``sept import-encoder`` reads beyond a plain state dict, a module per format.

- ``dinov2``: DINOv2's released ``.pth`` files (official key names) onto timm's DINOv2 ViTs,
  through timm's own ``checkpoint_filter_fn``;
- ``open_clip_visual``: an open_clip checkpoint's visual tower (a hub folder with
  ``open_clip_config.json``, or a file with ``--arch open_clip/NAME``) and its preprocessing;
- ``hf_folder``: a Hugging Face model folder (``config.json`` plus weights) through
  ``transformers``, with ``preprocessor_config.json``'s preprocessing.

Each gives ``sept.training.encoder.importer`` a loaded backbone, the arch and config that rebuild
it, and the preprocessing its checkpoint records (an ``Imported``). Every weights file is read
as safetensors or with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from sept.training.encoder.preprocess import Preprocessing


@dataclass
class Imported:
    """A checkpoint read by one format: the loaded backbone and what its encoder file records."""

    model: nn.Module
    dim: int
    arch: str
    arch_config: dict | None
    pool: str
    preprocessing: Preprocessing
    format: str
    """What was read, for the one line ``sept import-encoder`` prints ("DINOv2 checkpoint", ...)."""
    dropped_keys: list[str] = field(default_factory=list)
