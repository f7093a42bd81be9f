"""Retrieval quality of features on labelled images: kNN precision and kNN vote accuracy.

The bootstrap encoder exists to retrieve, so its checkpoints are compared by how well they
retrieve, not by their loss. ``knn_precision`` is the leave-one-out precision@k of a labelled
set (each image queries all the others; the share of its k nearest that carry its label).
``loo_knn_vote_accuracy`` and ``knn_vote_accuracy`` are the share of images whose k nearest
neighbours (the others of the set, or another set's) vote for their label: what `sept
encoder-check` reports (``sept.training.encoder_check``); ``target_share_among_pool`` is its
target-vs-pool number (the share of held-out target images among each query's k nearest in the
held-out images and a pool sample). All take L2-normalised float features
and compare them by inner product; ``nearest_neighbours`` is the one search they share.
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


def nearest_neighbours(
    xq: np.ndarray, xb: np.ndarray, k: int, *, leave_one_out: bool = False, chunk: int = 1024
) -> np.ndarray:
    """(nq, k) row indices of ``xb``: each query's k most similar rows by inner product, best
    first, ties broken by row order. ``leave_one_out``: ``xq`` is the first rows of ``xb`` (the
    set itself, or the set followed by others), and query i is never its own neighbour, row i.
    ``k`` is capped at the rows there are to choose from."""
    xq = np.asarray(xq, dtype=np.float32)
    xb = np.asarray(xb, dtype=np.float32)
    if leave_one_out and xq.shape != xb[: len(xq)].shape:
        raise ValueError(f"leave-one-out searches a set in itself, got {xq.shape} queries for {xb.shape} rows")
    k = int(min(max(1, k), len(xb) - leave_one_out))
    if k < 1:
        raise ValueError("no rows to search")
    I = np.empty((len(xq), k), dtype=np.int64)
    for start in range(0, len(xq), chunk):
        sim = xq[start : start + chunk] @ xb.T
        if leave_one_out:
            rows = np.arange(len(sim))
            sim[rows, start + rows] = -np.inf
        I[start : start + chunk] = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return I


def _labelled(features: np.ndarray, labels: Sequence[int], least: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels)
    if x.shape[0] != len(y):
        raise ValueError(f"{x.shape[0]} feature rows for {len(y)} labels")
    if len(y) < least:
        raise ValueError(f"{what} needs at least {least} labelled rows")
    return x, y


def knn_precision(features: np.ndarray, labels: Sequence[int], k: int = 5) -> float:
    """Leave-one-out precision@k: for every row, the share of its k most similar other rows
    (inner product; features L2-normalised) with the same label, averaged over rows.

    ``k`` is capped at (rows - 1). Ties are broken by row order."""
    x, y = _labelled(features, labels, 2, "knn_precision")
    nearest = nearest_neighbours(x, x, k, leave_one_out=True)
    return float((y[nearest] == y[:, None]).mean())


def majority_vote(neighbour_labels: np.ndarray) -> np.ndarray:
    """Each row's most frequent label (rows: neighbours' labels, nearest first). A tie goes to
    the tied label whose first neighbour is nearest, so the vote never depends on label order."""
    votes = (neighbour_labels[:, :, None] == neighbour_labels[:, None, :]).sum(axis=2)  # votes for j's label
    first_best = votes.argmax(axis=1)  # argmax takes the first (nearest) of equal counts
    return neighbour_labels[np.arange(len(neighbour_labels)), first_best]


def loo_knn_vote_accuracy(features: np.ndarray, labels: Sequence[int], k: int = 5) -> float:
    """Leave-one-out kNN accuracy: the share of rows whose k most similar other rows vote
    (``majority_vote``) for the row's own label. ``k`` is capped at (rows - 1)."""
    x, y = _labelled(features, labels, 2, "loo_knn_vote_accuracy")
    return float((majority_vote(y[nearest_neighbours(x, x, k, leave_one_out=True)]) == y).mean())


def knn_vote_accuracy(
    train_features: np.ndarray,
    train_labels: Sequence[int],
    val_features: np.ndarray,
    val_labels: Sequence[int],
    k: int = 5,
) -> float:
    """kNN accuracy of val retrieved from train: the share of val rows whose k most similar
    train rows vote (``majority_vote``) for the val row's label. ``k`` is capped at the train rows."""
    xb, yb = _labelled(train_features, train_labels, 1, "knn_vote_accuracy's train split")
    xq, yq = _labelled(val_features, val_labels, 1, "knn_vote_accuracy's val split")
    return float((majority_vote(yb[nearest_neighbours(xq, xb, k)]) == yq).mean())


def target_share_among_pool(queries: np.ndarray, targets: np.ndarray | None, pool: np.ndarray, k: int = 5) -> float:
    """The mean share of target rows among each query's k most similar rows of targets ∪ pool.

    ``targets`` None: the queries are their own targets, leave-one-out (each query's k nearest
    among the other queries and the pool). ``k`` is capped at the rows there are to choose from."""
    xq = np.asarray(queries, dtype=np.float32)
    xt = xq if targets is None else np.asarray(targets, dtype=np.float32)
    xp = np.asarray(pool, dtype=np.float32)
    if not len(xq) or not len(xt) or xp.ndim != 2 or xp.shape[1] != xq.shape[1] or xt.shape[1] != xq.shape[1]:
        raise ValueError(
            f"target_share_among_pool needs queries, targets and pool rows of one width, got "
            f"{xq.shape}, {xt.shape} and {xp.shape}"
        )
    nearest = nearest_neighbours(xq, np.concatenate([xt, xp]), k, leave_one_out=targets is None)
    return float((nearest < len(xt)).mean())


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
