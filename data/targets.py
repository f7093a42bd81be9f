"""Target tasks: the small labelled data set a selection is made for, read from disk.

Two layouts are accepted. An ImageFolder directory: ``train/CLASS/*.{jpg,jpeg,png,webp}`` and
optionally ``val/CLASS/*``, classes sorted by folder name. Or a directory whose ``train/`` (and
optional ``val/``) hold WebDataset tar shards of samples with an image and a ``cls`` member (the
class index as text); such samples are referred to as ``"TARPATH#KEY"``. A target set is curated
input, so a bad file in it is a ``SeptError`` naming the file, never a silent skip.
"""

from __future__ import annotations

import os
from collections import defaultdict
from contextlib import closing
from dataclasses import dataclass, field

from PIL import Image

from sept.data.decode import BadSample, decode_image
from sept.data.samples import IMAGE_EXTS, PoolSample, image_bytes, iter_samples
from sept.errors import SeptError

SPLITS = ("train", "val")
_TAR_REF_SEP = "#"


@dataclass
class TargetTask:
    """A labelled target task: class names and (image reference, class index) pairs per split.

    An image reference is a file path, or ``"TARPATH#KEY"`` for a sample inside a tar shard.
    """

    name: str
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]] = field(default_factory=list)

    def split(self, split: str) -> list[tuple[str, int]]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.train if split == "train" else self.val

    def labels(self, split: str) -> list[int]:
        """Class indices of ``split``, in the order of ``load_images(split)``."""
        return [label for _, label in self.split(split)]

    def load_images(self, split: str) -> list[Image.Image]:
        """The RGB images of ``split``, in the order of ``self.<split>``."""
        return load_image_refs([ref for ref, _ in self.split(split)])


def load_target(path: str, name: str | None = None) -> TargetTask:
    """Reads the target task at ``path`` (ImageFolder or tar-shard layout, see module doc).

    Raises ``SeptError`` naming the path if the directory or its ``train/`` is missing, if train
    holds no images, or if a class has no images.
    """
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise SeptError(f"target task not found: {root}")
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise SeptError(f"target task {root} has no train/ folder")
    val_dir = os.path.join(root, "val")
    has_val = os.path.isdir(val_dir)
    name = name or os.path.basename(root)
    if _tar_shards(train_dir):
        return _load_tar_target(name, train_dir, val_dir if has_val else None)
    return _load_folder_target(name, train_dir, val_dir if has_val else None)


# --- ImageFolder layout ---------------------------------------------------------------------


def _load_folder_target(name: str, train_dir: str, val_dir: str | None) -> TargetTask:
    classes = _class_folders(train_dir)
    if not classes:
        raise SeptError(f"target train folder has no images: {train_dir} holds no class folders")
    train = _folder_split(train_dir, classes, classes)
    val: list[tuple[str, int]] = []
    if val_dir is not None:
        val_classes = _class_folders(val_dir)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise SeptError(f"target val folder {val_dir} has classes missing from train: {', '.join(unknown)}")
        val = _folder_split(val_dir, val_classes, classes)
    return TargetTask(name=name, classes=classes, train=train, val=val)


def _class_folders(split_dir: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def _folder_split(split_dir: str, class_names: list[str], all_classes: list[str]) -> list[tuple[str, int]]:
    items: list[tuple[str, int]] = []
    for class_name in class_names:
        class_dir = os.path.join(split_dir, class_name)
        images = _image_files(class_dir)
        if not images:
            raise SeptError(f"target class folder has no images: {class_dir}")
        label = all_classes.index(class_name)
        items.extend((image, label) for image in images)
    return items


def _image_files(class_dir: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            ext = filename.rpartition(".")[2].lower()
            if not filename.startswith(".") and "." in filename and ext in IMAGE_EXTS:
                found.append(os.path.join(dirpath, filename))
    return found


# --- tar-shard layout -----------------------------------------------------------------------


def _tar_shards(split_dir: str) -> list[str]:
    return sorted(
        os.path.join(split_dir, f) for f in os.listdir(split_dir) if f.endswith(".tar") and not f.startswith(".")
    )


def _load_tar_target(name: str, train_dir: str, val_dir: str | None) -> TargetTask:
    train = _tar_split(train_dir)
    if not train:
        raise SeptError(f"target train folder has no images: {train_dir}")
    num_classes = max(label for _, label in train) + 1
    missing = sorted(set(range(num_classes)) - {label for _, label in train})
    if missing:
        raise SeptError(
            f"target train shards in {train_dir} have no images of class {missing[0]}"
            f" (classes are 0..{num_classes - 1})"
        )
    val = _tar_split(val_dir) if val_dir is not None else []
    out_of_range = [ref for ref, label in val if label >= num_classes]
    if out_of_range:
        raise SeptError(f"target val sample {out_of_range[0]} has a class not seen in train")
    classes = [str(i) for i in range(num_classes)]
    return TargetTask(name=name, classes=classes, train=train, val=val)


def _tar_split(split_dir: str) -> list[tuple[str, int]]:
    items: list[tuple[str, int]] = []
    for shard in _tar_shards(split_dir):
        for sample in iter_samples(shard):
            items.append((f"{shard}{_TAR_REF_SEP}{sample.key}", _class_index(shard, sample)))
    return items


def _class_index(shard: str, sample: PoolSample) -> int:
    if image_bytes(sample) is None:
        raise SeptError(f"target shard {shard}: sample {sample.key!r} has no image member")
    raw = sample.members.get("cls")
    if raw is None:
        raise SeptError(f"target shard {shard}: sample {sample.key!r} has no cls member")
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SeptError(f"target shard {shard}: sample {sample.key!r} has a non-integer cls") from None
    if label < 0:
        raise SeptError(f"target shard {shard}: sample {sample.key!r} has a negative cls {label}")
    return label


# --- images -----------------------------------------------------------------------------------


def load_image_refs(refs: list[str]) -> list[Image.Image]:
    """Decodes image references (file paths or ``"TARPATH#KEY"``) to RGB images, in order.

    Each tar is read once, whatever the number of its samples referenced.
    """
    images: list[Image.Image | None] = [None] * len(refs)
    wanted_by_tar: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, ref in enumerate(refs):
        if _TAR_REF_SEP in ref and not os.path.isfile(ref):
            shard, _, key = ref.rpartition(_TAR_REF_SEP)
            wanted_by_tar[shard][key].append(i)
        else:
            images[i] = _decode_target(_read_file(ref), ref)
    for shard, wanted in wanted_by_tar.items():
        with closing(iter_samples(shard)) as samples:
            for sample in samples:
                for i in wanted.pop(sample.key, []):
                    ref = f"{shard}{_TAR_REF_SEP}{sample.key}"
                    images[i] = _decode_target(image_bytes(sample), ref)
                if not wanted:
                    break
        if wanted:
            key = next(iter(wanted))
            raise SeptError(f"target shard {shard} has no sample {key!r}")
    return images  # type: ignore[return-value]  # every slot was filled or we raised


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise SeptError(f"cannot read target image {path}: {err.strerror or err}") from None


def _decode_target(data: bytes | None, ref: str) -> Image.Image:
    if data is None:
        raise SeptError(f"target sample has no image member: {ref}")
    try:
        return decode_image(data)
    except BadSample as err:
        raise SeptError(f"bad target image {ref}: {err}") from None
