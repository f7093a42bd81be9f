"""Bringing your own checkpoint: timm and torchvision state dicts imported into sept encoder files."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from sept.errors import SeptError
from sept.training.encoder import load_encoder
from sept.training.encoder.importer import import_encoder

timm = pytest.importorskip("timm")
torch.set_num_threads(1)


def _images(n=3, size=40):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def timm_model():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=7).eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_timm_state_dict_with_its_head_and_a_wrapper_prefix_embeds_like_the_model(timm_model, tmp_path, suffix):
    weights = str(tmp_path / f"w{suffix}")
    wrapped = {f"module.{k}": v.clone() for k, v in timm_model.state_dict().items()}
    if suffix == ".pth":
        torch.save({"state_dict": wrapped, "epoch": 3}, weights)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in wrapped.items()}, weights)
    out = import_encoder(weights, "timm/resnet10t", str(tmp_path / "enc.pt"), image_size=32)
    bundle = load_encoder(out, device="cpu")
    assert bundle.arch == "timm/resnet10t" and bundle.dim == timm_model.num_features and bundle.image_size == 32
    assert bundle.extra["dropped_keys"] == ["fc.bias", "fc.weight"]
    assert tuple(bundle.mean) == tuple(timm_model.pretrained_cfg["mean"])
    images = _images()
    got = bundle.embed_images(images)
    batch = torch.stack([bundle.preprocess(im) for im in images])
    with torch.no_grad():
        want = torch.nn.functional.normalize(
            timm_model.forward_head(timm_model.forward_features(batch), pre_logits=True), dim=1
        ).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_weights_that_do_not_fit_the_arch_name_the_file(timm_model, tmp_path):
    weights = str(tmp_path / "w.pth")
    torch.save(timm_model.state_dict(), weights)
    with pytest.raises(SeptError, match=r"w\.pth does not fit timm/resnet18: size mismatch"):
        import_encoder(weights, "timm/resnet18", str(tmp_path / "enc.pt"))
    prefixed = str(tmp_path / "net.pth")
    torch.save({f"net.{k}": v for k, v in timm_model.state_dict().items()}, prefixed)
    with pytest.raises(SeptError, match=r"net\.pth does not fit timm/resnet10t: .* missing .*--strip-prefix"):
        import_encoder(prefixed, "timm/resnet10t", str(tmp_path / "enc.pt"))
    assert (
        load_encoder(
            import_encoder(prefixed, "timm/resnet10t", str(tmp_path / "enc.pt"), prefixes=("net.",)), device="cpu"
        ).dim
        == timm_model.num_features
    )
    with pytest.raises(SeptError, match="unknown timm model"):
        import_encoder(weights, "timm/no_such_model_xyz", str(tmp_path / "enc.pt"))
    (tmp_path / "junk.pth").write_bytes(b"not torch")
    with pytest.raises(SeptError, match=r"cannot read weights .*junk\.pth"):
        import_encoder(str(tmp_path / "junk.pth"), "timm/resnet10t", str(tmp_path / "enc.pt"))


def test_a_torchvision_resnet_imports_too(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    weights = str(tmp_path / "r18.pth")
    torch.save(model.state_dict(), weights)
    bundle = load_encoder(import_encoder(weights, "resnet18", str(tmp_path / "enc.pt")), device="cpu")
    assert bundle.dim == 512 and bundle.image_size == 224 and bundle.extra["dropped_keys"] == ["fc.bias", "fc.weight"]


def _own_names(state_dict):
    """The timm ResNet's keys in a checkpoint's own naming, as lukemelas-style files have."""
    return {re.sub(r"^conv1\.", "_stem.", k).replace("layer", "_blocks."): v.clone() for k, v in state_dict.items()}


def test_a_key_map_renames_a_checkpoints_own_names_onto_the_backbone(timm_model, tmp_path):
    weights = str(tmp_path / "own.pth")
    torch.save(_own_names(timm_model.state_dict()), weights)
    with pytest.raises(
        SeptError,
        match=r"own\.pth does not fit timm/resnet10t: .*missing \(first: conv1\.0\.weight, closest in the checkpoint: _stem\.0\.weight\).*--key-map",
    ):
        import_encoder(weights, "timm/resnet10t", str(tmp_path / "enc.pt"))
    key_map = tmp_path / "map.yaml"
    key_map.write_text("- {from: '^_stem\\.', to: 'conv1.'}\n- {from: '^_blocks\\.(\\d)', to: 'layer\\1'}\n")
    out = import_encoder(weights, "timm/resnet10t", str(tmp_path / "enc.pt"), image_size=32, key_map=str(key_map))
    bundle = load_encoder(out, device="cpu")
    assert bundle.extra["key_map"] == str(key_map) and bundle.extra["dropped_keys"] == ["fc.bias", "fc.weight"]
    images = _images()
    batch = torch.stack([bundle.preprocess(im) for im in images])
    with torch.no_grad():
        want = torch.nn.functional.normalize(
            timm_model.forward_head(timm_model.forward_features(batch), pre_logits=True), dim=1
        ).numpy()
    np.testing.assert_allclose(bundle.embed_images(images), want, rtol=1e-4, atol=1e-5)


def test_a_bad_key_map_names_its_file_and_rule(timm_model, tmp_path):
    weights = str(tmp_path / "own.pth")
    torch.save(_own_names(timm_model.state_dict()), weights)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {from: '(', to: x}\n")
    with pytest.raises(SeptError, match=r"key map .*bad\.yaml: rule 1: '\(' is not a regex"):
        import_encoder(weights, "timm/resnet10t", str(tmp_path / "enc.pt"), key_map=str(bad))
    bad.write_text("- {from: a}\n")
    with pytest.raises(SeptError, match=r"bad\.yaml: rule 1 must have exactly the fields from and to"):
        import_encoder(weights, "timm/resnet10t", str(tmp_path / "enc.pt"), key_map=str(bad))
    merging = tmp_path / "merging.yaml"
    merging.write_text("- {from: '^_stem\\.0\\.', to: '_stem.1.'}\n")
    with pytest.raises(SeptError, match=r"renames both _stem\.0\.weight and _stem\.1\.weight to _stem\.1\.weight"):
        import_encoder(weights, "timm/resnet10t", str(tmp_path / "enc.pt"), key_map=str(merging))


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_a_pickle_that_would_run_code_is_refused_in_one_line(tmp_path, capsys):
    weights = str(tmp_path / "evil.pth")
    torch.save({"conv1.weight": torch.zeros(1), "hook": _RunsCode()}, weights)
    with pytest.raises(
        SeptError, match=r"evil\.pth is refused: unpickling it would build objects other than tensors"
    ) as err:
        import_encoder(weights, "resnet18", str(tmp_path / "enc.pt"))
    assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)
    assert "this pickle ran code" not in capsys.readouterr().out


def test_center_pool_centres_the_features_on_the_pool_they_will_search(timm_model, tmp_path):
    from sept.data.decode import decode_image
    from sept.data.demo_corpus import make_demo_corpus
    from sept.data.samples import iter_samples
    from sept.data.shards import list_shards

    corpus = make_demo_corpus(
        str(tmp_path / "corpus"), pool_size=40, shards=2, target_train_per_class=1, target_val_per_class=1
    )
    weights = str(tmp_path / "w.pth")
    torch.save(timm_model.state_dict(), weights)
    plain = load_encoder(import_encoder(weights, "timm/resnet10t", str(tmp_path / "plain.pt"), image_size=32))
    centred = load_encoder(
        import_encoder(
            weights,
            "timm/resnet10t",
            str(tmp_path / "c.pt"),
            image_size=32,
            center_pool=corpus.pool_spec,
            center_samples=25,
        )
    )
    assert plain.center is None and centred.center is not None
    assert centred.identity != plain.identity and centred.extra["center_of"] == 25
    images = [decode_image(s.members["jpg"]) for shard in list_shards(corpus.pool_spec) for s in iter_samples(shard)]
    raw = plain.embed_images(images)
    # the centre is the mean of the raw normalised features of a pool sample: close to the pool's own mean
    assert np.dot(centred.center.numpy(), raw.mean(0)) / np.linalg.norm(centred.center.numpy()) > 0.99 * np.linalg.norm(
        raw.mean(0)
    )
    expected = raw - centred.center.numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(centred.embed_images(images), expected, atol=1e-4)
    with pytest.raises(SeptError, match="--center-samples must be positive"):
        import_encoder(
            weights, "timm/resnet10t", str(tmp_path / "x.pt"), center_pool=corpus.pool_spec, center_samples=0
        )
