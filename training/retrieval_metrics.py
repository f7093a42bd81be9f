"""Retrieval quality of an encoder while it trains: kNN retrieval precision on labelled images.

The bootstrap encoder exists to retrieve, so its checkpoints are compared by how well they
retrieve, not by their loss. ``knn_precision`` is the leave-one-out precision@k of a labelled
set (each image queries all the others; the share of its k nearest that carry its label).
``RetrievalProbe`` holds a labelled image set preprocessed once, exactly as the embed stage
preprocesses (``EncoderBundle``), and scores a live backbone on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from sept.training.encoder import EncoderBundle


def knn_precision(features: np.ndarray, labels: Sequence[int], k: int = 5) -> float:
    """Leave-one-out precision@k: for every row, the share of its k most similar other rows
    (inner product; features L2-normalised) with the same label, averaged over rows.

    ``k`` is capped at (rows - 1). Ties are broken by row order."""
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels)
    n = len(y)
    if x.shape[0] != n:
        raise ValueError(f"{x.shape[0]} feature rows for {n} labels")
    if n < 2:
        raise ValueError("knn_precision needs at least two labelled rows")
    k = int(min(max(1, k), n - 1))
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return float((y[nearest] == y[:, None]).mean())


@dataclass
class RetrievalProbe:
    """Labelled images to score encoders on; ``images`` are preprocessed float tensors."""

    images: torch.Tensor
    labels: np.ndarray
    k: int = 5

    @classmethod
    def from_images(
        cls,
        images: Sequence[Image.Image],
        labels: Sequence[int],
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        k: int = 5,
    ) -> RetrievalProbe:
        """Preprocesses ``images`` once, as ``EncoderBundle.preprocess`` does for ``image_size``."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images for {len(labels)} labels")
        if len(images) < 2:
            raise ValueError("a retrieval probe needs at least two labelled images")
        prep = EncoderBundle(
            model=nn.Identity(),
            arch="",
            image_size=image_size,
            mean=tuple(mean),
            std=tuple(std),
            dim=0,
            identity="",
            device=torch.device("cpu"),
        )
        return cls(torch.stack([prep.preprocess(im) for im in images]), np.asarray(labels), k)

    def features(self, backbone: nn.Module, batch_size: int = 256) -> np.ndarray:
        """L2-normalised features of the probe images; the backbone is left in eval mode."""
        device = next(backbone.parameters()).device
        bundle = EncoderBundle(
            model=backbone,
            arch="",
            image_size=int(self.images.shape[-1]),
            mean=(0, 0, 0),
            std=(1, 1, 1),
            dim=0,
            identity="",
            device=device,
        )
        return np.concatenate(
            [bundle.embed(self.images[i : i + batch_size]) for i in range(0, len(self.images), batch_size)]
        )

    def score(self, backbone: nn.Module) -> float:
        """``knn_precision`` of the backbone's features of the probe images."""
        return knn_precision(self.features(backbone), self.labels, self.k)
