"""Pool listings: brace patterns, folders, text listings, globs; their order and their errors."""

import os

import pytest

from sept.data.shards import list_shards
from sept.errors import SeptError


def _touch_shards(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return [str(folder / name) for name in names]


def test_brace_pattern_lists_in_pattern_order(tmp_path):
    paths = _touch_shards(tmp_path / "pool", [f"{i:05d}.tar" for i in range(12)])
    assert list_shards(str(tmp_path / "pool" / "{00000..00011}.tar")) == paths
    assert list_shards(str(tmp_path / "pool" / "{00003..00004}.tar")) == paths[3:5]


def test_brace_pattern_names_the_missing_shard(tmp_path):
    _touch_shards(tmp_path / "pool", ["00000.tar", "00002.tar"])
    with pytest.raises(SeptError, match=r"pool shard not found: .*00001\.tar"):
        list_shards(str(tmp_path / "pool" / "{00000..00002}.tar"))


def test_directory_lists_tars_sorted_by_name_only(tmp_path):
    pool = tmp_path / "pool"
    # created out of order, with files that are not shards alongside
    _touch_shards(pool, ["b.tar", "a.tar", "c.tar", "00000_stats.json", "notes.txt", ".hidden.tar"])
    (pool / "sub.tar").mkdir()  # a folder named like a shard is not a shard
    assert list_shards(str(pool)) == [str(pool / n) for n in ("a.tar", "b.tar", "c.tar")]


def test_empty_directory_matches_no_shard(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeptError, match="matches no shard"):
        list_shards(str(tmp_path / "empty"))


def test_text_listing_resolves_relative_to_itself(tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    paths = _touch_shards(pool, ["x.tar", "y.tar", "z.tar"])
    listing = tmp_path / "lists" / "pool.txt"
    listing.parent.mkdir()
    listing.write_text(f"# my pool\n../pool/z.tar\n\n  ../pool/x.tar  \n{paths[1]}\n")
    monkeypatch.chdir(pool)  # the working directory must not matter
    assert list_shards(str(listing)) == [paths[2], paths[0], paths[1]]


def test_text_listing_with_missing_shard_and_empty_listing(tmp_path):
    listing = tmp_path / "pool.txt"
    listing.write_text("gone.tar\n")
    with pytest.raises(SeptError, match=r"pool shard not found: .*gone\.tar"):
        list_shards(str(listing))
    listing.write_text("# nothing\n\n")
    with pytest.raises(SeptError, match="names no shard"):
        list_shards(str(listing))


def test_single_shard_list_of_specs_and_glob(tmp_path, monkeypatch):
    paths = _touch_shards(tmp_path / "p", ["0.tar", "1.tar", "2.tar"])
    monkeypatch.chdir(tmp_path)
    assert list_shards("p/1.tar") == [paths[1]]
    assert all(os.path.isabs(p) for p in list_shards("p"))
    assert list_shards(["p/2.tar", "p/{0..1}.tar"]) == [paths[2], paths[0], paths[1]]
    assert list_shards("p/*.tar") == paths
    with pytest.raises(SeptError, match="matches no shard"):
        list_shards("p/*.zip")


def test_missing_single_shard_and_empty_spec(tmp_path):
    with pytest.raises(SeptError, match=r"pool shard not found: .*nope\.tar"):
        list_shards(str(tmp_path / "nope.tar"))
    with pytest.raises(SeptError):
        list_shards([])
    with pytest.raises(SeptError):
        list_shards("  ")


def test_shard_listed_twice_is_refused(tmp_path):
    paths = _touch_shards(tmp_path / "p", ["0.tar", "1.tar"])
    os.symlink(paths[0], tmp_path / "p" / "alias.tar.link")
    with pytest.raises(SeptError, match="listed twice"):
        list_shards([paths[0], paths[1], paths[0]])
    with pytest.raises(SeptError, match="listed twice"):
        list_shards([str(tmp_path / "p"), str(tmp_path / "p" / "alias.tar.link")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_shard(tmp_path):
    (path,) = _touch_shards(tmp_path, ["locked.tar"])
    os.chmod(path, 0)
    with pytest.raises(SeptError, match="locked.tar"):
        list_shards(path)
