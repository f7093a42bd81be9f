"""Encoder checkpoint contract: save/load round trip, identity, torchvision state dicts, bad files."""

import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from sept.errors import SeptError
from sept.io import is_staging_name
from sept.training.encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_backbone,
    load_encoder,
    save_encoder,
)

torch.set_num_threads(1)


def _images(n, size=20, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def small_encoder(tmp_path):
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18_small", width=8)
    path = str(tmp_path / "enc.pt")
    save_encoder(
        path,
        backbone,
        arch="resnet18_small",
        image_size=16,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        extra={"method": "simclr"},
    )
    return path, backbone, dim


def test_build_backbone_dims():
    backbone, dim = build_backbone("resnet18_small", width=8)
    assert dim == 64
    assert backbone(torch.zeros(2, 3, 16, 16)).shape == (2, 64)
    with pytest.raises(SeptError, match="unknown encoder arch 'vit'"):
        build_backbone("vit")


def test_round_trip_embeds_like_the_saved_model(small_encoder):
    path, backbone, dim = small_encoder
    bundle = load_encoder(path, device="cpu")
    assert (bundle.arch, bundle.image_size, bundle.dim) == ("resnet18_small", 16, dim)
    assert bundle.extra == {"method": "simclr"}
    assert not [f for f in os.listdir(os.path.dirname(path)) if is_staging_name(f)]

    images = _images(5)
    batch = torch.stack([bundle.preprocess(im) for im in images])
    assert batch.shape == (5, 3, 16, 16) and batch.dtype == torch.float32
    features = bundle.embed(batch)
    assert features.dtype == np.float32 and features.shape == (5, dim)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)

    backbone.eval()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(backbone(batch), dim=1).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5)
    np.testing.assert_allclose(bundle.embed_images(images, batch_size=2), features, atol=1e-5)


def test_identity_is_stable_and_follows_the_weights(small_encoder, tmp_path):
    path, backbone, _ = small_encoder
    first = load_encoder(path, device="cpu").identity
    assert len(first) == 16 and int(first, 16) >= 0
    assert load_encoder(path, device="cpu").identity == first

    same_again = str(tmp_path / "again.pt")
    save_encoder(same_again, backbone, arch="resnet18_small", image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert load_encoder(same_again, device="cpu").identity == first

    with torch.no_grad():
        backbone.conv1.weight[0, 0, 0, 0] += 1e-3
    changed = str(tmp_path / "changed.pt")
    save_encoder(changed, backbone, arch="resnet18_small", image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert load_encoder(changed, device="cpu").identity != first


def test_width_is_read_back_from_the_weights(tmp_path):
    backbone, dim = build_backbone("resnet18_small", width=4)
    path = str(tmp_path / "w4.pt")
    save_encoder(path, backbone, arch="resnet18_small", image_size=8, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert load_encoder(path, device="cpu").dim == dim == 32


def test_plain_torchvision_state_dict_loads(tmp_path):
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None)
    path = str(tmp_path / "resnet18.pth")
    torch.save(model.state_dict(), path)
    bundle = load_encoder(path, device="cpu")
    assert (bundle.arch, bundle.dim, bundle.image_size) == ("resnet18", 512, 224)
    assert bundle.mean == IMAGENET_MEAN and bundle.std == IMAGENET_STD
    x = torch.randn(2, 3, 64, 64)
    model.fc = torch.nn.Identity()
    model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(x), dim=1).numpy()
    np.testing.assert_allclose(bundle.embed(x), expected, atol=1e-5)


def test_torchvision_resnet50_is_told_apart(tmp_path):
    model = torchvision.models.resnet50(weights=None)
    path = str(tmp_path / "r50.pth")
    torch.save(model.state_dict(), path)
    bundle = load_encoder(path, device="cpu")
    assert (bundle.arch, bundle.dim) == ("resnet50", 2048)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"definitely not a checkpoint", "unreadable"),
        ({"foo": torch.zeros(3)}, "fits none"),
        ([1, 2, 3], "holds list"),
        ({"sept_encoder": {"arch": "resnet18_small"}}, "lacks"),
    ],
)
def test_not_an_encoder(tmp_path, content, reason):
    path = str(tmp_path / "bad.pt")
    if isinstance(content, bytes):
        with open(path, "wb") as f:
            f.write(content)
    else:
        torch.save(content, path)
    with pytest.raises(SeptError, match=rf"^not an encoder checkpoint: {path} \(.*{reason}"):
        load_encoder(path, device="cpu")


def test_missing_file(tmp_path):
    with pytest.raises(SeptError, match="encoder checkpoint not found"):
        load_encoder(str(tmp_path / "nope.pt"))


def test_weights_only_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path = str(tmp_path / "evil.pt")
    torch.save({"x": Evil()}, path)
    with pytest.raises(SeptError, match="not an encoder checkpoint"):
        load_encoder(path, device="cpu")
