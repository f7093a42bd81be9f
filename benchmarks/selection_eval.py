"""Scoring a selection against kept-aside truth, by the rules sept selects with, in memory.

Everything here runs in one process on features held in memory: the pool is read once,
features are computed by an encoder (or a trivial feature of ``sept.training.trivial_features``), the target's train images are the
queries, and ``sept.index.budget.fill_budget`` makes the same round-robin selection the real
``select`` stage makes (exact inner-product search, which is what a Flat index returns).
"""

from __future__ import annotations

from contextlib import closing

import numpy as np
from PIL import Image

from sept.data.decode import decode_sample
from sept.data.identity import make_ids
from sept.data.samples import ShardStats, iter_samples
from sept.data.shards import list_shards
from sept.index.budget import Selection, fill_budget, neighbours_needed


def load_pool(pool_spec: str) -> tuple[np.ndarray, list[str], list[Image.Image]]:
    """(ids, keys, RGB images) of every decodable pool sample, in listing order."""
    ids, keys, images = [], [], []
    for shard_index, shard in enumerate(list_shards(pool_spec)):
        with closing(iter_samples(shard, ShardStats())) as samples:
            for position, sample in enumerate(samples):
                img = decode_sample(sample, ShardStats())
                if img is not None:
                    ids.append(int(make_ids(shard_index, [position])[0]))
                    keys.append(sample.key)
                    images.append(img)
    return np.asarray(ids, dtype=np.int64), keys, images


def search(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products, best first: (D, I) as faiss returns them (I indexes ``xb``)."""
    sim = xq @ xb.T
    k = min(k, xb.shape[0])
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable")
    I = np.take_along_axis(top, order, axis=1)
    return np.take_along_axis(sim, I, axis=1).astype(np.float32), I.astype(np.int64)


def round_robin(xq: np.ndarray, xb: np.ndarray, budget: int) -> Selection:
    """SEPT's per-instance round-robin selection (row indices of ``xb``), as ``select`` makes it."""
    k = neighbours_needed(budget, len(xq), len(xb))
    while True:
        D, I = search(xq, xb, k)
        selection = fill_budget(D, I, budget)
        if len(selection) >= budget or k >= len(xb):
            return selection
        k = min(len(xb), 2 * k)


def precision(selected_keys, truth: dict[str, str], relevant) -> float:
    """Share of selected keys whose truth is one of ``relevant``."""
    keys = list(selected_keys)
    return float(np.mean([truth[k] in relevant for k in keys])) if keys else 0.0


def per_class_precision(selected_keys, truth: dict[str, str]) -> dict[str, float]:
    """Share of the selection in each truth class (sums to 1)."""
    keys = list(selected_keys)
    classes = sorted(set(truth.values()))
    return {c: float(np.mean([truth[k] == c for k in keys])) if keys else 0.0 for c in classes}


def refinement_selections(
    xq: np.ndarray, query_labels: np.ndarray, xb: np.ndarray, budget: int, *, seed: int = 0
) -> dict[str, Selection]:
    """Each selection rule of ``sept.index.query_refine`` / ``sept.index.strategies`` on the same
    embeddings and budget; ids are row indices of ``xb``."""
    from sept.index import query_refine as qr
    from sept.index.strategies import choose, cluster_streams, fill, instance_streams, topk_streams, train_clusters

    k = max(neighbours_needed(budget, len(xq), len(xb)), 4 * -(-budget // len(xq)))
    D, I = search(xq, xb, k)
    out: dict[str, Selection] = {}
    out["per-instance round robin (--topk-share 0)"] = choose(D, I, budget)
    out["class-balanced round robin"] = choose(D, I, budget, balance="class", query_class=query_labels)

    protos, _ = qr.class_prototypes(xq, query_labels)
    Dp, Ip = search(protos, xb, k)
    out["instances + class prototypes as queries"] = choose(np.concatenate([D, Dp]), np.concatenate([I, Ip]), budget)
    out["50% instances, 50% class prototypes"] = fill(
        qr.mix_streams([instance_streams(D, I), instance_streams(Dp, Ip)], [0.5, 0.5]), budget
    )

    for top in (1, 3):
        xe = qr.expand_queries(xq, xb[I[:, :top]], D[:, :top], alpha=3.0)
        De, Ie = search(xe, xb, k)
        out[f"query expansion (alpha-QE, top {top})"] = choose(De, Ie, budget)

    Ds, _ = search(xb, xb, 11)
    for kk in (5, 10):
        kth = qr.kth_neighbour_similarity(Ds, kk)
        Dr, Ir = qr.k_reciprocal_rerank(D, I, kth[I])
        out[f"k-reciprocal re-rank (k={kk})"] = choose(Dr, Ir, budget)

    centroids = train_clusters(xb, int(round(np.sqrt(len(xb)))), seed=seed)
    pool = lambda: iter([(xb, np.arange(len(xb)))])  # noqa: E731
    streams, _, _ = cluster_streams(centroids, xq, pool, budget)
    out["pool clusters (cluster strategy)"] = fill(streams, budget)
    out["50% instances, 50% pool clusters"] = fill(
        qr.mix_streams([instance_streams(D, I), streams], [0.5, 0.5]), budget
    )
    out["global top-k (topk strategy)"] = choose(D, I, budget, strategy="topk")
    out["50% instances, 50% global top-k"] = fill(
        qr.mix_streams([instance_streams(D, I), topk_streams(D, I)], [0.5, 0.5]), budget
    )
    return out


DEFAULT_RULE = "sept default (class-balanced: half round robin, half top-k)"
RULES = (DEFAULT_RULE, "round robin", "class-balanced", "global top-k")
CLASSIFIER_RULE = "logistic classifier"
"""Not a search rule: a reference that learns from the pool too (``classifier_selection``)."""


def centred(xb: np.ndarray, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sides minus the pool's mean feature, normalised again (what a centred encoder does)."""
    mu = xb.mean(axis=0)

    def norm(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return norm(norm(xb) - mu), norm(norm(xq) - mu)


def rule_selections(xq: np.ndarray, query_labels: np.ndarray, xb: np.ndarray, budget: int) -> dict[str, Selection]:
    """The selection rules of ``RULES`` (sept's default, per-instance round robin, class-balanced
    round robin, global top-k) on the same features; ids are row indices of ``xb``."""
    from sept.cluster.select_config import SelectConfig
    from sept.index.strategies import choose

    k = max(neighbours_needed(budget, len(xq), len(xb)), min(len(xb), budget))
    D, I = search(xq, xb, k)
    return {
        DEFAULT_RULE: choose(
            D, I, budget, balance=SelectConfig.balance, query_class=query_labels, topk_share=SelectConfig.topk_share
        ),
        "round robin": choose(D, I, budget),
        "class-balanced": choose(D, I, budget, balance="class", query_class=query_labels),
        "global top-k": choose(D, I, budget, strategy="topk"),
    }


def classifier_selection(
    xq: np.ndarray, xb: np.ndarray, budget: int, *, negatives: int = 1000, seed: int = 0, C: float = 1.0
) -> np.ndarray:
    """Row indices of ``xb``: the ``budget`` pool samples a logistic regression scores highest,
    trained on the target's train features (positive) against ``negatives`` pool samples drawn at
    random (negative, unlabelled: they hold the pool's relevant share too); classes weighted to
    balance. The pool's truth is never seen."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    neg = rng.choice(len(xb), size=min(negatives, len(xb)), replace=False)
    X = np.concatenate([xq, xb[neg]])
    y = np.concatenate([np.ones(len(xq)), np.zeros(len(neg))])
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=5000).fit(X, y)
    return np.argsort(-model.decision_function(xb), kind="stable")[:budget]
