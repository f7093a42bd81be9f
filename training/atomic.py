"""Atomic file writes for training outputs: write a temporary file beside the target, then os.replace.

A reader (another rank, a resumed job, the next stage) sees either the old file or the new one,
never a half-written checkpoint, even when the writer is killed (SLURM preemption) mid-write.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch


def _temporary_beside(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are read by other jobs and users
    return tmp


def atomic_torch_save(obj: Any, path: str) -> str:
    """``torch.save(obj)`` to ``path`` atomically; returns ``path``."""
    tmp = _temporary_beside(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str, text: str) -> str:
    """Writes ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    tmp = _temporary_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
