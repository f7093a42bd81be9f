"""The demo corpus: sizes, domain balance, target/pool disjointness, determinism, reuse."""

import collections
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sept.data.demo_corpus import DOMAINS, make_demo_corpus
from sept.data.samples import iter_samples
from sept.data.shards import list_shards
from sept.data.targets import load_target
from sept.errors import SeptError
from sept.io import is_staging_name

SMALL = dict(pool_size=202, shards=3, target_train_per_class=3, target_val_per_class=2, image_size=16, seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(str(tmp_path_factory.mktemp("demo") / "corpus"), **SMALL)


@pytest.fixture(scope="module")
def pool(corpus):
    return [(shard, s) for shard in list_shards(corpus.pool_spec) for s in iter_samples(shard)]


def _files(root):
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = Path(path).read_bytes()
    return out


def test_pool_shards_look_like_img2dataset_output(corpus, pool):
    shards = list_shards(corpus.pool_spec)
    assert [os.path.basename(p) for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(pool) == 202
    per_shard = collections.Counter(shard for shard, _ in pool)
    assert sorted(per_shard.values()) == [67, 67, 68]
    for shard, sample in pool:
        index = shards.index(shard)
        assert sample.key == f"{index:05d}{sample.position:04d}"
        assert set(sample.members) == {"jpg", "json", "txt"}
        meta = json.loads(sample.members["json"])
        assert meta["key"] == sample.key and meta["status"] == "success"
        assert (meta["width"], meta["height"]) == (16, 16)
        assert not any(d in json.dumps(meta) for d in DOMAINS)  # the truth stays out of samples
        image = Image.open(io.BytesIO(sample.members["jpg"]))
        assert image.format == "JPEG" and image.size == (16, 16) and image.mode == "RGB"
        assert sample.members["txt"].decode()


def test_domains_are_balanced_and_mixed_across_shards(corpus, pool):
    truth = corpus.truth()
    assert set(truth) == {s.key for _, s in pool}
    counts = collections.Counter(truth.values())
    assert set(counts) == set(DOMAINS)
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 202
    for shard in list_shards(corpus.pool_spec):
        in_shard = {truth[s.key] for sh, s in pool if sh == shard}
        assert in_shard == set(DOMAINS)
    assert corpus.target_domain == "digits"


def test_domains_differ_visually(corpus, pool):
    # A cheap sanity check that the renderers make different kinds of pictures: textures carry
    # more high-frequency energy than smooth gradients.
    truth = corpus.truth()

    def roughness(sample):
        grey = np.asarray(Image.open(io.BytesIO(sample.members["jpg"])).convert("L"), dtype=float)
        return np.abs(np.diff(grey, axis=1)).mean()

    mean = {d: np.mean([roughness(s) for _, s in pool if truth[s.key] == d]) for d in DOMAINS}
    assert mean["textures"] > 2 * mean["gradients"]


def test_target_task_is_an_image_folder_of_digits(corpus):
    task = load_target(corpus.target_dir)
    assert task.classes == [str(d) for d in range(10)]
    assert collections.Counter(label for _, label in task.train) == {d: 3 for d in range(10)}
    assert collections.Counter(label for _, label in task.val) == {d: 2 for d in range(10)}
    assert all(im.size == (16, 16) for im in task.load_images("val"))


def test_target_digits_are_disjoint_from_pool_digits(corpus, pool):
    from sklearn.datasets import load_digits

    digits = load_digits()
    with open(corpus.provenance_path) as f:
        provenance = json.load(f)
    truth = corpus.truth()
    pool_keys = {k for k, d in truth.items() if d == "digits"}
    assert set(provenance["pool"]) == pool_keys
    target_sources = provenance["target"]
    task = load_target(corpus.target_dir)
    rel = [os.path.relpath(p, corpus.target_dir) for p, _ in task.train + task.val]
    assert sorted(rel) == sorted(target_sources)
    for path, source in target_sources.items():
        assert int(path.split("/")[1]) == digits.target[source]  # folder = the digit's label
    assert len(set(target_sources.values())) == len(target_sources)  # train and val disjoint
    pool_pixels = {digits.images[i].tobytes() for i in provenance["pool"].values()}
    target_pixels = {digits.images[i].tobytes() for i in target_sources.values()}
    assert len(target_pixels) == 50 and len(pool_pixels) >= 40
    assert not pool_pixels & target_pixels


def test_same_parameters_give_identical_bytes_other_seed_differs(corpus, tmp_path):
    again = make_demo_corpus(str(tmp_path / "again"), **SMALL)
    assert _files(corpus.root) == _files(again.root)
    other = make_demo_corpus(str(tmp_path / "other"), **{**SMALL, "seed": 8})
    assert _files(other.root)["pool/00000.tar"] != _files(corpus.root)["pool/00000.tar"]


def test_existing_corpus_is_reused_or_refused(corpus, tmp_path):
    before = os.stat(os.path.join(corpus.pool_dir, "00000.tar")).st_mtime_ns
    assert make_demo_corpus(corpus.root, **SMALL) == corpus
    assert os.stat(os.path.join(corpus.pool_dir, "00000.tar")).st_mtime_ns == before
    with pytest.raises(SeptError, match="different demo corpus"):
        make_demo_corpus(corpus.root, **{**SMALL, "pool_size": 300})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(SeptError, match="not empty"):
        make_demo_corpus(str(foreign), **SMALL)
    assert os.listdir(foreign) == ["thesis.tex"]
    (tmp_path / "empty").mkdir()
    made = make_demo_corpus(str(tmp_path / "empty"), **{**SMALL, "pool_size": 8, "shards": 1})
    assert len(list_shards(made.pool_spec)) == 1
    leftovers = [n for n in os.listdir(tmp_path) if is_staging_name(n)]
    assert leftovers == []


@pytest.mark.parametrize(
    "bad",
    [dict(shards=0), dict(pool_size=3), dict(target_train_per_class=200), dict(image_size=4)],
)
def test_bad_parameters_are_refused(tmp_path, bad):
    with pytest.raises(SeptError):
        make_demo_corpus(str(tmp_path / "x"), **{**SMALL, **bad})
    assert not (tmp_path / "x").exists()
