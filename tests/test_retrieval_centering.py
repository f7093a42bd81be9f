"""Feature centring: an encoder's stored centre, how embed applies it, and the bootstrap's centre."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sept.training.encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_backbone,
    load_encoder,
    save_encoder,
    weights_identity,
)

torch.set_num_threads(1)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    model, dim = build_backbone("resnet18_small", width=4)
    return model, dim


def test_embed_subtracts_the_centre_and_normalises_again(backbone, tmp_path):
    model, dim = backbone
    plain = load_encoder(
        save_encoder(
            str(tmp_path / "plain.pt"),
            model,
            arch="resnet18_small",
            image_size=16,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
        device="cpu",
    )
    images = _images(12)
    x = plain.embed_images(images)
    center = x.mean(axis=0)
    centred = load_encoder(
        save_encoder(
            str(tmp_path / "c.pt"),
            model,
            arch="resnet18_small",
            image_size=16,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            center=center,
        ),
        device="cpu",
    )
    assert plain.center is None and torch.allclose(centred.center, torch.as_tensor(center))
    y = centred.embed_images(images)
    expected = F.normalize(torch.as_tensor(x) - torch.as_tensor(center), dim=1).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
    # An untrained network's features are nearly collinear; centred ones are not.
    off_diagonal = ~np.eye(len(images), dtype=bool)
    assert (x @ x.T)[off_diagonal].mean() > 0.9 > (y @ y.T)[off_diagonal].mean()
    # The centre is part of what the encoder is: another centre, another identity.
    assert centred.identity != plain.identity
    state = {k: v for k, v in model.state_dict().items()}
    assert plain.identity == weights_identity(
        state, arch="resnet18_small", image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )


def test_a_centre_of_the_wrong_size_is_refused(backbone, tmp_path):
    model, dim = backbone
    with pytest.raises(ValueError, match="center has 3 values"):
        save_encoder(
            str(tmp_path / "bad.pt"),
            model,
            arch="resnet18_small",
            image_size=16,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            center=[0.0, 0.0, 0.0],
        )
    with pytest.raises(ValueError, match="non-finite"):
        save_encoder(
            str(tmp_path / "bad.pt"),
            model,
            arch="resnet18_small",
            image_size=16,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            center=[float("nan")] * dim,
        )
