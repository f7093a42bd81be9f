"""Bringing your own checkpoint: a state dict, a DINOv2 release, an open_clip checkpoint or a
Hugging Face folder becomes a sept encoder file.

A sept encoder file names its architecture (``sept.training.encoder.archs``). ``timm/NAME`` is any
timm model, built by ``timm.create_model(NAME, pretrained=False, num_classes=0)`` (pooled
features, no classifier) and filled from local weights only: nothing is ever downloaded.

``import_encoder`` reads what ``--weights`` names:

- a weights file (``.safetensors``, or torch read with ``weights_only=True``) for ``--arch``:
  a key prefix that wrappers add (``module.``, ``model.``, ``backbone.``, ``encoder.``) is
  stripped, keys are renamed by the ``--key-map`` file if one is given, a DINOv2 release is
  converted to timm's names (``formats.dinov2``), an ``open_clip/NAME`` arch takes the visual
  tower (``formats.open_clip_visual``); every backbone weight must then be present with its shape
  (``key_map.check_fit``), and the keys the backbone has no place for (a classifier head, a text
  tower) are dropped and listed in the file's provenance;
- a folder: an open_clip hub folder (``open_clip_config.json``) or a Hugging Face model folder
  (``config.json``, ``formats.hf_folder``), whose config names the architecture.

The encoder file records the preprocessing the checkpoint's own config gives (timm's
``pretrained_cfg``, open_clip's ``preprocess_cfg``, ``preprocessor_config.json``), each value
replaced by the caller's where given, and the pooling ``--pool`` chose
(``sept.training.encoder.pooling``). What was chosen is announced in one line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from sept.errors import SeptError, first_line
from sept.training.encoder.archs import HF_PREFIX, OPEN_CLIP_PREFIX, TIMM_PREFIX, build_backbone
from sept.training.encoder.bundle import load_encoder, save_encoder
from sept.training.encoder.formats import Imported, dinov2, hf_folder, open_clip_visual
from sept.training.encoder.key_map import apply_key_map, check_fit, read_key_map
from sept.training.encoder.pooling import check_pool
from sept.training.encoder.preprocess import INTERPOLATIONS, default_preprocessing, timm_preprocessing
from sept.training.encoder.weights_file import read_state_dict

log = logging.getLogger(__name__)

DEFAULT_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
FORMATS = ("auto", "state-dict", "dinov2", "open_clip", "hf")
"""What ``--weights`` is: told apart (``auto``), a state dict for ``--arch``, a DINOv2 release,
an open_clip checkpoint (folder, or a file for ``--arch open_clip/NAME``), a Hugging Face folder."""
__all__ = ["DEFAULT_PREFIXES", "FORMATS", "import_encoder", "read_state_dict", "strip_prefixes"]


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Removes the first of ``prefixes`` that every key starts with, repeatedly (``module.model.x`` -> ``x``)."""
    out = dict(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if out and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def import_encoder(
    weights: str,
    arch: str | None,
    out: str,
    *,
    format: str = "auto",  # noqa: A002 - the CLI flag's name
    image_size: int | None = None,
    resize_size: int | None = None,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pool: str | None = None,
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
    key_map: str | None = None,
    arch_kwargs: Mapping | None = None,
    announce: Callable[[str], None] | None = None,
    center_pool: str | None = None,
    center_samples: int = 2048,
) -> str:
    """Writes the sept encoder file ``out`` from ``weights`` (a file for ``arch``, or a model
    folder, whose ``arch`` may be left None); returns ``out``.

    ``format`` is one of ``FORMATS``: ``auto`` tells them apart by the folder's config file, the
    arch's prefix and a DINOv2 release's keys; any other is required of ``weights``, and
    ``dinov2`` names the timm arch itself when ``arch`` is None. ``key_map``: a YAML file of
    ordered regex renames for a checkpoint with its own key names
    (``sept.training.encoder.key_map``). ``arch_kwargs``: keyword arguments for timm's
    ``create_model`` (``{"img_size": 224}``), recorded with the arch. ``image_size``,
    ``resize_size``, ``interpolation``, ``mean``, ``std`` replace the checkpoint's own values;
    ``pool`` is ``default``, ``cls`` or ``mean``. ``announce`` gets the one line saying what was
    chosen (default: logged). ``center_pool``: a pool spec whose mean normalised feature, over a
    random sample of ``center_samples`` images, the encoder subtracts (as ``sept bootstrap``'s do):
    a checkpoint's features on a foreign pool share one direction that hides their differences."""
    pool = check_pool(pool)
    if format not in FORMATS:
        raise SeptError(f"unknown format {format!r} (choose from {', '.join(FORMATS)})")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise SeptError(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    if os.path.isdir(weights):
        if key_map is not None or arch_kwargs:
            raise SeptError(f"--key-map and --arch-kwargs apply to a weights file; {weights} is a model folder")
        imported = _from_folder(weights, arch, format, pool, prefixes)
    else:
        imported = _from_file(weights, arch, format, pool, prefixes, key_map, dict(arch_kwargs or {}), image_size)
    prep = imported.preprocessing.overridden(
        image_size=image_size, resize_size=resize_size, interpolation=interpolation, mean=mean, std=std
    )
    _check_runs(imported, prep.image_size)
    if imported.dropped_keys:
        log.info(
            "import: dropped %d keys the backbone has no place for: %s",
            len(imported.dropped_keys),
            ", ".join(imported.dropped_keys[:6]),
        )
    (announce or log.info)(
        f"{imported.arch} ({imported.format}), pool {pool}, {imported.dim}-d features; preprocessing: {prep.describe()}"
    )
    saved = dict(
        arch=imported.arch,
        image_size=prep.image_size,
        mean=prep.mean,
        std=prep.std,
        resize_size=prep.resize_size,
        interpolation=prep.interpolation,
        pool=pool,
        arch_config=imported.arch_config,
        dim=imported.dim,
        extra=dict(
            source=os.path.abspath(weights),
            imported=True,
            format=imported.format,
            preprocessing_source=prep.source,
            dropped_keys=imported.dropped_keys,
            key_map=os.path.abspath(key_map) if key_map else None,
        ),
    )
    save_encoder(out, imported.model, **saved)
    if center_pool is not None:
        center, count = _pool_center(out, center_pool, center_samples)
        saved["extra"].update(center_pool=center_pool, center_of=count)
        save_encoder(out, imported.model, center=center, **saved)
        (announce or log.info)(f"features centred on the mean of {count} images of {center_pool}")
    return out


def _pool_center(encoder_path: str, pool: str, samples: int) -> tuple[np.ndarray, int]:
    """The mean normalised feature of a random sample of the pool under the (uncentred) encoder."""
    from sept.data.shards import list_shards
    from sept.training.bootstrap import feature_center, sample_pool

    if samples < 1:
        raise SeptError(f"--center-samples must be positive, got {samples}")
    items, _, _ = sample_pool(list_shards(pool), samples, seed=0)
    if not items:
        raise SeptError(f"pool {pool} holds no image to centre the features on")
    return feature_center(load_encoder(encoder_path, device="cpu"), items), len(items)


def _check_runs(imported: Imported, image_size: int) -> None:
    """One blank image through the backbone at the recorded size: an encoder file that could not
    embed (a ViT built for another size) is refused here, not at ``sept embed``."""
    model = imported.model.eval()
    try:
        with torch.inference_mode():
            features = model(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as err:
        size_kwarg = json.dumps({"img_size": image_size})
        hint = f" (a timm ViT: --arch-kwargs '{size_kwarg}')" if imported.arch.startswith(TIMM_PREFIX) else ""
        raise SeptError(f"{imported.arch} does not take {image_size}-px images{hint}: {first_line(err)}") from None
    if tuple(features.shape) != (1, imported.dim):
        raise SeptError(f"{imported.arch} gives features of shape {tuple(features.shape)}, not (1, {imported.dim})")


def _from_file(
    weights: str,
    arch: str | None,
    fmt: str,
    pool: str,
    prefixes: Sequence[str],
    key_map: str | None,
    arch_kwargs: dict,
    image_size: int | None,
) -> Imported:
    if fmt == "hf" or (arch or "").startswith(HF_PREFIX):
        raise SeptError(f"a Hugging Face model imports from its folder (config.json and weights), not {weights}")
    if fmt == "open_clip" and not (arch or "").startswith(OPEN_CLIP_PREFIX):
        raise SeptError(
            f"an open_clip checkpoint file needs --arch open_clip/NAME (a built-in model config); "
            f"or pass its folder holding {open_clip_visual.CONFIG_NAME}"
        )
    state_dict = strip_prefixes(read_state_dict(weights), prefixes)
    if key_map is not None:
        state_dict = apply_key_map(state_dict, read_key_map(key_map))
    if arch and arch.startswith(OPEN_CLIP_PREFIX):
        if fmt not in ("auto", "open_clip"):
            raise SeptError(f"--arch {arch} is an open_clip model; its format is open_clip, not {fmt}")
        if arch_kwargs:
            raise SeptError("--arch-kwargs applies to timm archs; an open_clip model's config is its own")
        name = arch[len(OPEN_CLIP_PREFIX) :]
        return _open_clip(
            state_dict, open_clip_visual.builtin_config(name), {}, arch, pool, weights, f"open_clip {name} checkpoint"
        )
    is_dinov2 = dinov2.is_dinov2_checkpoint(state_dict)
    if fmt == "dinov2" and not is_dinov2:
        raise SeptError(f"{weights} is not a DINOv2 release: it has no mask_token and patch_embed.proj.weight")
    use_dinov2 = fmt == "dinov2" or (fmt == "auto" and is_dinov2 and (arch is None or arch.startswith(TIMM_PREFIX)))
    if use_dinov2 and not arch:
        arch, inferred = dinov2.timm_arch(state_dict, image_size=image_size)
        arch_kwargs = {**inferred, **arch_kwargs}
    if not arch:
        raise SeptError(f"--arch is needed for the weights file {weights} (a model folder names its own)")
    return _state_dict(state_dict, arch, pool, arch_kwargs, weights, dinov2_release=use_dinov2)


def _state_dict(
    state_dict: dict, arch: str, pool: str, arch_kwargs: dict, source: str, *, dinov2_release: bool
) -> Imported:
    """A timm or torchvision backbone filled from a state dict (a DINOv2 release converted first)."""
    model, dim = build_backbone(arch, config=arch_kwargs or None, pool=pool)
    fmt = "state dict"
    if dinov2_release:
        state_dict = dinov2.to_timm(state_dict, model, arch=arch)
        fmt = "DINOv2 checkpoint (timm's checkpoint_filter_fn)"
    dropped = check_fit(state_dict, model.state_dict(), source=source, arch=arch)
    model.load_state_dict(state_dict, strict=False)  # check_fit: only the dropped keys are extra
    img_size = arch_kwargs.get("img_size")
    if img_size is not None:  # the model was built for it; timm's pretrained record still says its own size
        prep = timm_preprocessing(model, image_size=img_size if isinstance(img_size, int) else img_size[-1])
    else:
        prep = default_preprocessing(arch, model)
    return Imported(model, dim, arch, arch_kwargs or None, pool, prep, fmt, dropped)


def _open_clip(
    state_dict: Mapping, model_cfg: Mapping, preprocess_cfg: Mapping, arch: str, pool: str, source: str, fmt: str
) -> Imported:
    # The visual tower's part of the config is all that rebuilds it, and all its identity depends on.
    config = {k: model_cfg[k] for k in ("embed_dim", "vision_cfg", "quick_gelu") if k in model_cfg}
    visual, dim = open_clip_visual.build_visual(config, pool)
    tower, text_keys = open_clip_visual.visual_state_dict(state_dict)
    dropped = check_fit(tower, visual.state_dict(), source=source, arch=arch)
    visual.load_state_dict(tower, strict=False)
    where = f"{open_clip_visual.CONFIG_NAME} preprocess_cfg" if preprocess_cfg else "open_clip's defaults"
    prep = open_clip_visual.preprocessing(visual, preprocess_cfg, source=where)
    return Imported(visual, dim, arch, config, pool, prep, fmt, sorted(dropped + text_keys))


def _from_folder(path: str, arch: str | None, fmt: str, pool: str, prefixes: Sequence[str]) -> Imported:
    """An open_clip hub folder or a Hugging Face folder; a hub folder holding both (laion's do)
    reads as open_clip unless ``fmt`` is ``hf``."""
    name = os.path.basename(os.path.normpath(path))
    if fmt in ("dinov2", "state-dict"):
        raise SeptError(f"--format {fmt} reads a weights file; {path} is a folder")
    if fmt in ("auto", "open_clip") and open_clip_visual.is_open_clip_folder(path):
        if arch and not arch.startswith(OPEN_CLIP_PREFIX):
            raise SeptError(f"{path} is an open_clip folder; its arch is open_clip/NAME, not {arch}")
        model_cfg, preprocess_cfg, weights = open_clip_visual.read_folder(path)
        state_dict = strip_prefixes(read_state_dict(weights), prefixes)
        arch = arch or f"{OPEN_CLIP_PREFIX}{name}"
        return _open_clip(state_dict, model_cfg, preprocess_cfg, arch, pool, weights, "open_clip folder")
    if fmt in ("auto", "hf") and hf_folder.is_hf_folder(path):
        if arch and not arch.startswith(HF_PREFIX):
            raise SeptError(f"{path} is a Hugging Face folder; its arch is hf/CLASS, not {arch}")
        class_name = arch[len(HF_PREFIX) :] if arch else None
        model, class_name, config, dim, dropped = hf_folder.load_folder(path, class_name, pool)
        prep = hf_folder.preprocessing(path, config)
        return Imported(
            model, dim, f"{HF_PREFIX}{class_name}", config, pool, prep, f"Hugging Face {class_name} folder", dropped
        )
    wanted = {
        "open_clip": f"{open_clip_visual.CONFIG_NAME} (open_clip)",
        "hf": f"{hf_folder.CONFIG_NAME} (Hugging Face)",
    }.get(fmt, f"neither {hf_folder.CONFIG_NAME} (Hugging Face) nor {open_clip_visual.CONFIG_NAME} (open_clip)")
    raise SeptError(f"{path} is a folder with {'no ' if fmt != 'auto' else ''}{wanted}")
