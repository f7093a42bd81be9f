"""Target task loading: ImageFolder and tar-shard layouts, and their errors."""

import io

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from sept.data.targets import load_target
from sept.errors import SeptError


def _save(path, value, size=(12, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path, format=fmt)


def _png_bytes(value):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder_task(tmp_path):
    root = tmp_path / "birds"
    _save(root / "train" / "wren" / "b.png", 10)
    _save(root / "train" / "wren" / "a.JPG", 20, fmt="JPEG")
    _save(root / "train" / "auk" / "nested" / "c.webp", 30)
    _save(root / "train" / "auk" / "d.jpeg", 40, fmt="JPEG")
    (root / "train" / "auk" / "notes.txt").write_text("not an image")
    _save(root / "val" / "wren" / "e.png", 50)
    return root


def test_image_folder_classes_labels_and_images(folder_task):
    task = load_target(str(folder_task))
    assert task.name == "birds"
    assert task.classes == ["auk", "wren"]
    names = [(p.split("/train/")[1], label) for p, label in task.train]
    assert names == [
        ("auk/d.jpeg", 0),
        ("auk/nested/c.webp", 0),
        ("wren/a.JPG", 1),
        ("wren/b.png", 1),
    ]
    assert [(p.split("/val/")[1], label) for p, label in task.val] == [("wren/e.png", 1)]
    images = task.load_images("train")
    assert all(im.mode == "RGB" and im.size == (12, 10) for im in images)
    grey = [im.getpixel((5, 5))[0] for im in images]  # lossy formats: allow a little drift
    assert np.allclose(grey, [40, 30, 20, 10], atol=3)
    assert task.labels("val") == [1]
    assert load_target(str(folder_task), name="custom").name == "custom"


def test_missing_val_gives_an_empty_split(folder_task):
    import shutil

    shutil.rmtree(folder_task / "val")
    task = load_target(str(folder_task))
    assert task.val == [] and task.load_images("val") == []


def test_loader_errors_name_the_path(tmp_path, folder_task):
    with pytest.raises(SeptError, match=r"target task not found: .*nowhere"):
        load_target(str(tmp_path / "nowhere"))
    (tmp_path / "notrain").mkdir()
    with pytest.raises(SeptError, match=r"notrain has no train/"):
        load_target(str(tmp_path / "notrain"))
    (tmp_path / "noclasses" / "train").mkdir(parents=True)
    with pytest.raises(SeptError, match="no images"):
        load_target(str(tmp_path / "noclasses"))
    (folder_task / "train" / "empty_class").mkdir()
    (folder_task / "train" / "empty_class" / "readme.md").write_text("x")
    with pytest.raises(SeptError, match=r"class folder has no images: .*empty_class"):
        load_target(str(folder_task))


def test_val_class_unknown_to_train_is_an_error(folder_task):
    _save(folder_task / "val" / "penguin" / "x.png", 1)
    with pytest.raises(SeptError, match="penguin"):
        load_target(str(folder_task))


def test_undecodable_target_image_names_the_file(folder_task):
    (folder_task / "train" / "wren" / "b.png").write_bytes(b"broken")
    task = load_target(str(folder_task))
    with pytest.raises(SeptError, match=r"b\.png"):
        task.load_images("train")


def test_tar_layout_with_cls_members(tmp_path):
    root = tmp_path / "tartask"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    with wds.TarWriter(str(root / "train" / "000.tar"), encoder=False) as sink:
        for i, cls in enumerate([2, 0, 1, 2]):
            sink.write({"__key__": f"t{i}", "png": _png_bytes(10 * i), "cls": str(cls).encode()})
    with wds.TarWriter(str(root / "val" / "000.tar"), encoder=False) as sink:
        sink.write({"__key__": "v0", "png": _png_bytes(99), "cls": b"1\n"})
    task = load_target(str(root))
    assert task.classes == ["0", "1", "2"]
    assert [label for _, label in task.train] == [2, 0, 1, 2]
    assert task.train[1][0].endswith("000.tar#t1")
    assert [im.getpixel((0, 0))[0] for im in task.load_images("train")] == [0, 10, 20, 30]
    assert [im.getpixel((0, 0))[0] for im in task.load_images("val")] == [99]


def test_tar_layout_errors(tmp_path):
    root = tmp_path / "tartask"
    (root / "train").mkdir(parents=True)
    with wds.TarWriter(str(root / "train" / "000.tar"), encoder=False) as sink:
        sink.write({"__key__": "a", "png": _png_bytes(1), "cls": b"0"})
        sink.write({"__key__": "b", "png": _png_bytes(2)})
    with pytest.raises(SeptError, match=r"000\.tar.*'b' has no cls"):
        load_target(str(root))
    with wds.TarWriter(str(root / "train" / "000.tar"), encoder=False) as sink:
        sink.write({"__key__": "a", "png": _png_bytes(1), "cls": b"2"})
    with pytest.raises(SeptError, match="no images of class 0"):
        load_target(str(root))
