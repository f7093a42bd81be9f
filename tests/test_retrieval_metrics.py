"""training/retrieval_metrics: leave-one-out kNN precision and the probe that scores a live backbone."""

import numpy as np
import pytest
import torch
from PIL import Image

from sept.training.encoder import IMAGENET_MEAN, IMAGENET_STD, EncoderBundle, build_backbone
from sept.training.retrieval_metrics import RetrievalProbe, knn_precision

torch.set_num_threads(1)


def test_knn_precision_by_hand():
    # Two tight pairs far apart: every row's nearest other row shares its label.
    x = np.asarray([[1, 0], [0.99, 0.14], [0, 1], [0.14, 0.99]], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert knn_precision(x, [0, 0, 1, 1], k=1) == 1.0
    # Labels crossed over the pairs: every nearest neighbour is wrong.
    assert knn_precision(x, [0, 1, 0, 1], k=1) == 0.0
    # k=2: nearest right, second wrong, for every row.
    assert knn_precision(x, [0, 0, 1, 1], k=2) == 0.5
    # k is capped at n - 1 and the row itself never counts.
    assert knn_precision(x, [0, 0, 1, 1], k=10) == pytest.approx(1 / 3)


def test_knn_precision_rejects_bad_input():
    with pytest.raises(ValueError):
        knn_precision(np.ones((3, 2), np.float32), [0, 1])
    with pytest.raises(ValueError):
        knn_precision(np.ones((1, 2), np.float32), [0])


def _images(n, colour_of):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a = np.full((16, 16, 3), colour_of(i), dtype=np.uint8)
        a += rng.integers(0, 8, a.shape, dtype=np.uint8)
        out.append(Image.fromarray(a))
    return out


def test_probe_preprocesses_like_the_embed_stage_and_scores_a_backbone():
    images = _images(8, lambda i: (220, 30, 30) if i % 2 else (30, 30, 220))
    labels = [i % 2 for i in range(8)]
    probe = RetrievalProbe.from_images(images, labels, image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, k=3)
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18_small", width=4)
    bundle = EncoderBundle(
        model=backbone,
        arch="resnet18_small",
        image_size=16,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        dim=dim,
        identity="",
        device=torch.device("cpu"),
    )
    expected = bundle.embed_images(images)
    np.testing.assert_allclose(probe.features(backbone), expected, rtol=1e-5, atol=1e-6)
    assert probe.score(backbone) == pytest.approx(knn_precision(expected, labels, 3))
    # Red vs blue images are told apart by any network that sees colour.
    assert probe.score(backbone) == 1.0
    with pytest.raises(ValueError):
        RetrievalProbe.from_images(images[:1], labels[:1], image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
