"""`sept import-encoder` on each checkpoint format: a small, randomly initialised model of each family,
saved the way its library saves it, imported through the CLI, embeds as its library's forward pass.

Each test builds the model with the source library (timm, open_clip, transformers; a DINOv2 release
is timm's DINOv2 ViT in the official key names), writes it in that format, runs `sept
import-encoder`, loads the bundle as `sept embed` does and compares its vectors with the library's
own forward pass on the same preprocessed batch. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file

from sept.cli import main
from sept.training.encoder import load_encoder

torch.set_num_threads(1)


def _images(n=3):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(n)]


def _import(capsys, *args) -> tuple[int, str]:
    """`sept import-encoder ARGS`, in this process; its exit status and stderr."""
    capsys.readouterr()  # what the test's own setup printed
    rc = main(["import-encoder", *map(str, args)])
    return rc, capsys.readouterr().err


def _sept_and_batch(out):
    """What `sept embed` computes for the test images, and the preprocessed batch it fed."""
    bundle = load_encoder(str(out), device="cpu")
    batch = torch.stack([bundle.preprocess(im) for im in _images()])
    return bundle, bundle.embed(batch), batch


def _assert_same(got, want):
    want = F.normalize(want.detach().float(), dim=1).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# --- timm ------------------------------------------------------------------------------------------

TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TINY_VIT).eval()
    path = tmp_path_factory.mktemp("timm") / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_a_timm_vit_with_its_preprocessing_from_pretrained_cfg(vit_file, tmp_path, capsys):
    model, path = vit_file
    out = tmp_path / "enc.pt"
    rc, err = _import(
        capsys,
        "--weights",
        path,
        "--arch",
        "timm/vit_tiny_patch16_224",
        "--arch-kwargs",
        json.dumps(TINY_VIT),
        "--out",
        out,
    )
    assert rc == 0, err
    bundle, got, batch = _sept_and_batch(out)
    # timm's record for the model: crop_pct 0.9 (resize to floor(32 / 0.9)), bicubic, mean and std 0.5
    cfg = model.pretrained_cfg
    assert (bundle.image_size, bundle.resize_size, bundle.interpolation) == (32, 35, cfg["interpolation"])
    assert bundle.mean == tuple(cfg["mean"]) and bundle.std == tuple(cfg["std"])
    assert "resize 35 bicubic, crop 32" in err and "timm pretrained_cfg" in err
    with torch.no_grad():
        _assert_same(got, model.forward_head(model.forward_features(batch), pre_logits=True))


def test_pool_is_recorded_in_the_identity(vit_file, tmp_path, capsys):
    model, path = vit_file
    bundles = {}
    for pool in ("default", "cls", "mean"):
        out = tmp_path / f"{pool}.pt"
        args = ["--weights", path, "--arch", "timm/vit_tiny_patch16_224", "--arch-kwargs", json.dumps(TINY_VIT)]
        rc, err = _import(capsys, *args, "--pool", pool, "--out", out)
        assert rc == 0, err
        assert f"pool {pool}" in err
        bundles[pool] = _sept_and_batch(out)
        assert bundles[pool][0].pool == pool
    assert len({b.identity for b, _, _ in bundles.values()}) == 3  # same weights, other vectors
    batch = bundles["mean"][2]
    with torch.no_grad():
        tokens = model.forward_features(batch)
    _assert_same(bundles["cls"][1], tokens[:, 0])
    _assert_same(bundles["mean"][1], tokens[:, model.num_prefix_tokens :].mean(dim=1))
    # a ResNet has no class token: one line, exit 2
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), tmp_path / "r.pth")
    rc, err = _import(
        capsys, "--weights", tmp_path / "r.pth", "--arch", "timm/resnet10t", "--pool", "cls", "--out", out
    )
    assert rc == 2 and "--pool cls needs a class token" in err and len(err.strip().splitlines()) == 1


def test_a_vit_imported_for_another_size_is_refused_at_import(vit_file, tmp_path, capsys):
    _, path = vit_file
    args = ["--weights", path, "--arch", "timm/vit_tiny_patch16_224", "--arch-kwargs", json.dumps(TINY_VIT)]
    rc, err = _import(capsys, *args, "--image-size", 48, "--out", tmp_path / "enc.pt")
    assert rc == 2 and "does not take 48-px images" in err and '"img_size": 48' in err
    assert not (tmp_path / "enc.pt").exists()


# --- DINOv2 releases -------------------------------------------------------------------------------


def _official_dinov2(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm DINOv2 weights in the released files' names and layout (facebookresearch/dinov2):
    ``pos_embed`` holds the class token's position, registers are ``register_tokens`` outside the
    position embedding, and ``mask_token`` is there (used in training only). Blocks are named alike
    (``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ``patch_embed.proj``)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    width = sd["cls_token"].shape[-1]
    if "reg_token" in sd:
        cls_pos = torch.randn(1, 1, width)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - cls_pos
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    sd["mask_token"] = torch.zeros(1, width)
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.ls1.gamma"} <= set(sd)
    return sd


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_a_dinov2_release_goes_onto_timms_dinov2_vit(name, tmp_path, capsys):
    torch.manual_seed(0)
    kwargs = dict(depth=1, img_size=28)  # ViT-S/14's width, one block, a 2x2 position grid
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    for p in model.parameters():  # layer scale starts at 1e-5: make the blocks count
        p.data.add_(0.02 * torch.randn_like(p))
    weights = tmp_path / "dinov2_pretrain.pth"
    torch.save(_official_dinov2(model), weights)
    out = tmp_path / "enc.pt"
    rc, err = _import(capsys, "--weights", weights, "--format", "dinov2", "--out", out)  # the arch read off the file
    assert rc == 0, err
    bundle, got, batch = _sept_and_batch(out)
    assert bundle.arch == f"timm/{name}" and bundle.arch_config == kwargs and bundle.image_size == 28
    assert "DINOv2 checkpoint" in err and bundle.extra["dropped_keys"] == []
    with torch.no_grad():
        _assert_same(got, model(batch))
        # and as timm itself loads the very file (its checkpoint_filter_fn), with no download
        timm_loaded = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), num_classes=0, **kwargs
        ).eval()
        _assert_same(got, timm_loaded(batch))
    # at another size: timm's filter resamples the position embedding, as timm does for the same file
    rc, err = _import(capsys, "--weights", weights, "--format", "dinov2", "--image-size", 42, "--out", out)
    assert rc == 0, err
    bundle, got, batch = _sept_and_batch(out)
    assert bundle.arch_config == dict(kwargs, img_size=42) and bundle.image_size == 42
    with torch.no_grad():
        timm_loaded = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), num_classes=0, depth=1, img_size=42
        ).eval()
        _assert_same(got, timm_loaded(batch))
    # named explicitly, a register checkpoint on the plain model is one line
    other = "vit_small_patch14_dinov2" if "reg4" in name else "vit_small_patch14_reg4_dinov2"
    rc, err = _import(
        capsys, "--weights", weights, "--arch", f"timm/{other}", "--arch-kwargs", json.dumps(kwargs), "--out", out
    )
    assert rc == 2 and "register tokens" in err and len(err.strip().splitlines()) == 1


# --- open_clip -------------------------------------------------------------------------------------

TEXT_CFG = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
OPEN_CLIP_TOWERS = {
    "vit": dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
    "resnet": dict(image_size=32, layers=[1, 1, 1, 1], width=8),
}


def _open_clip_folder(folder: Path, vision_cfg: dict, preprocess: dict, *, safetensors: bool) -> open_clip.CLIP:
    """A CLIP model in an open_clip hub folder, written as ``open_clip.push_to_hf_hub.save_for_hf``
    writes one (its config through open_clip's own ``save_config_for_hf``)."""
    from open_clip.push_to_hf_hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, save_config_for_hf

    torch.manual_seed(0)
    model_cfg = dict(embed_dim=16, vision_cfg=vision_cfg, text_cfg=TEXT_CFG)
    model = open_clip.CLIP(**model_cfg).eval()
    model.visual.image_mean, model.visual.image_std = preprocess["mean"], preprocess["std"]
    model.visual.preprocess_cfg = preprocess
    folder.mkdir()
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=model_cfg)
    if safetensors:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / HF_SAFE_WEIGHTS_NAME))
    else:
        torch.save(model.state_dict(), folder / HF_WEIGHTS_NAME)
    return model


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_an_open_clip_folder_gives_its_visual_tower(tower, tmp_path, capsys):
    preprocess = dict(mean=list(open_clip.OPENAI_DATASET_MEAN), std=list(open_clip.OPENAI_DATASET_STD))
    folder = tmp_path / f"clip-{tower}"
    model = _open_clip_folder(folder, OPEN_CLIP_TOWERS[tower], preprocess, safetensors=tower == "vit")
    out = tmp_path / "enc.pt"
    rc, err = _import(capsys, "--weights", folder, "--out", out)
    assert rc == 0, err
    bundle, got, batch = _sept_and_batch(out)
    # CLIP's normalisation, bicubic, the tower's size
    assert bundle.mean == open_clip.OPENAI_DATASET_MEAN and bundle.std == open_clip.OPENAI_DATASET_STD
    assert (bundle.image_size, bundle.resize_size, bundle.interpolation) == (32, None, "bicubic")
    assert bundle.arch == f"open_clip/clip-{tower}" and bundle.dim == 16
    assert all(not k.startswith("visual.") for k in bundle.extra["dropped_keys"])  # the text tower
    assert any(k.startswith("transformer.") for k in bundle.extra["dropped_keys"])
    with torch.no_grad():
        _assert_same(got, model.encode_image(batch))
    if tower == "resnet":  # the mean over positions instead of the attention pool
        rc, err = _import(capsys, "--weights", folder, "--pool", "mean", "--out", tmp_path / "mean.pt")
        assert rc == 0, err
        bundle, got, batch = _sept_and_batch(tmp_path / "mean.pt")
        visual = model.visual
        with torch.no_grad():
            x = visual.stem(batch)
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        _assert_same(got, x.mean(dim=(2, 3)))


def test_an_open_clip_training_checkpoint_with_a_built_in_model_name(tmp_path, capsys):
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config("ViT-S-32")
    torch.manual_seed(0)
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"]).eval()
    # what open_clip's training loop saves (the text tower's keys left out here, to keep the file small)
    state_dict = {f"module.visual.{k}": v for k, v in visual.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state_dict}, tmp_path / "epoch_3.pt")
    rc, err = _import(
        capsys, "--weights", tmp_path / "epoch_3.pt", "--arch", "open_clip/ViT-S-32", "--out", tmp_path / "enc.pt"
    )
    assert rc == 0, err
    bundle, got, batch = _sept_and_batch(tmp_path / "enc.pt")
    assert bundle.image_size == 224 and bundle.mean == open_clip.OPENAI_DATASET_MEAN
    with torch.no_grad():
        _assert_same(got, visual(batch))


def test_an_open_clip_preprocess_cfg_is_read_and_flags_override_it(tmp_path, capsys):
    preprocess = dict(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], interpolation="bilinear", resize_mode="shortest")
    folder = tmp_path / "clip"
    _open_clip_folder(folder, OPEN_CLIP_TOWERS["vit"], preprocess, safetensors=True)
    rc, err = _import(capsys, "--weights", folder, "--format", "open_clip", "--out", tmp_path / "a.pt")
    assert rc == 0, err
    bundle = load_encoder(str(tmp_path / "a.pt"), device="cpu")
    assert (bundle.mean, bundle.std, bundle.interpolation) == ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bilinear")
    assert "preprocess_cfg" in bundle.extra["preprocessing_source"]
    rc, err = _import(
        capsys, "--weights", folder, "--interpolation", "bicubic", "--resize-size", 36, "--std", 1, 1, 1,
        "--out", tmp_path / "b.pt",
    )  # fmt: skip
    assert rc == 0, err
    bundle = load_encoder(str(tmp_path / "b.pt"), device="cpu")
    assert (bundle.resize_size, bundle.interpolation, bundle.std) == (36, "bicubic", (1.0, 1.0, 1.0))
    assert bundle.mean == (0.5, 0.4, 0.3) and "--resize-size, --interpolation, --std given" in err


# --- Hugging Face folders --------------------------------------------------------------------------

HF_MODELS = {  # class -> (config, image processor): hidden size 32, 2 layers, 32-px images
    "ViTModel": (
        transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8),
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}),
    ),
    "Dinov2Model": (
        transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        transformers.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    ),
    "CLIPVisionModel": (
        transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, projection_dim=16),
        transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    ),
    "ConvNextModel": (
        transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], image_size=32),
        transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875),
    ),
}  # fmt: skip


def _hf_folder(folder: Path, class_name: str, *, safetensors: bool = True):
    config, processor = HF_MODELS[class_name]
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if not safetensors:  # an older save: pytorch_model.bin
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model


def _hf_reference(model, class_name: str, batch: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=batch)
    # ViTModel's default: its class token after the final norm (its pooler is a trained layer most lack)
    return out.last_hidden_state[:, 0] if class_name == "ViTModel" else out.pooler_output


@pytest.mark.parametrize("class_name", list(HF_MODELS))
def test_a_hugging_face_folder_embeds_like_transformers(class_name, tmp_path, capsys):
    folder = tmp_path / "model"
    model = _hf_folder(folder, class_name, safetensors=class_name != "Dinov2Model")
    out = tmp_path / "enc.pt"
    rc, err = _import(capsys, "--weights", folder, "--out", out)
    assert rc == 0, err
    bundle, got, batch = _sept_and_batch(out)
    _, processor = HF_MODELS[class_name]
    assert bundle.arch == f"hf/{class_name}" and bundle.image_size == 32
    assert bundle.mean == tuple(processor.image_mean) and bundle.std == tuple(processor.image_std)
    assert "preprocessor_config.json" in err
    with torch.no_grad():
        _assert_same(got, _hf_reference(model, class_name, batch))


def test_hugging_face_preprocessing_is_read_from_preprocessor_config(tmp_path, capsys):
    expected = {  # (resize, crop, interpolation) each processor's own rule gives
        "ViTModel": (None, 32, "bilinear"),  # a fixed 32x32 resize
        "Dinov2Model": (36, 32, "bicubic"),  # shortest edge 36, centre crop 32
        "ConvNextModel": (36, 32, "bicubic"),  # crop_pct: int(32 / 0.875) = 36, crop 32
    }
    for class_name, want in expected.items():
        folder = tmp_path / class_name
        _hf_folder(folder, class_name)
        rc, err = _import(capsys, "--weights", folder, "--out", tmp_path / f"{class_name}.pt")
        assert rc == 0, err
        bundle = load_encoder(str(tmp_path / f"{class_name}.pt"), device="cpu")
        assert (bundle.resize_size, bundle.image_size, bundle.interpolation) == want, class_name
    # flags override the file, and the printed line says so
    rc, err = _import(
        capsys, "--weights", tmp_path / "ConvNextModel", "--image-size", 48, "--mean", 0, 0, 0,
        "--pool", "mean", "--out", tmp_path / "big.pt",
    )  # fmt: skip
    assert rc == 0, err
    bundle = load_encoder(str(tmp_path / "big.pt"), device="cpu")
    assert (bundle.image_size, bundle.resize_size, bundle.mean, bundle.pool) == (48, 54, (0.0, 0.0, 0.0), "mean")
    assert "--image-size, --mean given" in err and "resize 54 bicubic, crop 48" in err


def test_a_hugging_face_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    folder = tmp_path / "model"
    _hf_folder(folder, "ViTModel", safetensors=False)
    torch.save({"hook": _RunsCode()}, folder / "pytorch_model.bin")
    rc, err = _import(capsys, "--weights", folder, "--out", tmp_path / "enc.pt")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "pytorch_model.bin is refused: unpickling it would build objects other than tensors" in err
    assert "this pickle ran code" not in err


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


# --- any other state dict: --key-map ---------------------------------------------------------------


def test_a_key_map_mismatch_is_one_line_naming_the_key_and_its_closest_candidate(tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    own = {k.replace("layer", "stage_"): v for k, v in model.state_dict().items()}
    torch.save(own, tmp_path / "own.pth")
    key_map = tmp_path / "map.yaml"
    key_map.write_text("- {from: '^stage_(\\d)\\.0\\.conv1', to: 'layer\\1.0.conv1'}\n")  # too narrow a rule
    args = ["--weights", tmp_path / "own.pth", "--arch", "timm/resnet10t", "--out", tmp_path / "enc.pt"]
    rc, err = _import(capsys, *args, "--key-map", key_map)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "missing (first: layer1.0.bn1.weight, closest in the checkpoint: stage_1.0.bn1.weight)" in err
    key_map.write_text("- {from: '^stage_', to: 'layer'}\n")
    rc, err = _import(capsys, *args, "--key-map", key_map)
    assert rc == 0, err
    bundle, got, batch = _sept_and_batch(tmp_path / "enc.pt")
    with torch.no_grad():
        _assert_same(got, model(batch))


def test_a_whole_clip_model_folder_gives_its_vision_tower(tmp_path, capsys):
    vision = dict(HF_MODELS["CLIPVisionModel"][0].to_dict())
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text)).eval()
    model.save_pretrained(tmp_path / "clip")
    rc, err = _import(capsys, "--weights", tmp_path / "clip", "--pool", "mean", "--out", tmp_path / "enc.pt")
    assert rc == 0, err
    bundle, got, batch = _sept_and_batch(tmp_path / "enc.pt")
    assert bundle.arch == "hf/CLIPVisionModel" and "text_projection.weight" in bundle.extra["dropped_keys"]
    with torch.no_grad():  # the patch tokens after CLIP's final norm, averaged
        hidden = model.vision_model(pixel_values=batch).last_hidden_state
        _assert_same(got, model.vision_model.post_layernorm(hidden)[:, 1:].mean(dim=1))


def test_a_format_that_does_not_fit_the_weights_is_one_line(vit_file, tmp_path, capsys):
    _, path = vit_file
    out = tmp_path / "enc.pt"
    for args, message in [
        (["--format", "dinov2"], "is not a DINOv2 release"),
        (["--format", "hf"], "a Hugging Face model imports from its folder"),
        (["--format", "open_clip"], "an open_clip checkpoint file needs --arch open_clip/NAME"),
        (["--format", "state-dict"], "--arch is needed for the weights file"),
    ]:
        rc, err = _import(capsys, "--weights", path, *args, "--out", out)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    (tmp_path / "empty").mkdir()
    rc, err = _import(capsys, "--weights", tmp_path / "empty", "--format", "hf", "--out", out)
    assert rc == 2 and "is a folder with no config.json (Hugging Face)" in err
    assert not out.exists()
