"""sept.io: a published file or folder is whole or absent, and staged leftovers are found by name."""

from __future__ import annotations

import json
import os

import pytest

from sept.io import (
    atomic_file,
    atomic_target,
    atomic_write_json,
    is_staging_name,
    publish_dir,
    remove_stale_staging,
    staging_dir,
)


def test_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(str(path), {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(str(path)) as f:
            f.write('{"a": 2')  # half a document, then the writer dies
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_target_path_for_libraries_is_published_readable(tmp_path):
    path = tmp_path / "sub" / "blob.bin"
    with atomic_target(str(path)) as tmp:
        assert is_staging_name(os.path.basename(tmp)) and os.path.dirname(tmp) == str(path.parent)
        with open(tmp, "wb") as f:
            f.write(b"xyz")
        assert not path.exists()
    assert path.read_bytes() == b"xyz"
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_publish_dir_keeps_the_first_of_two_writers(tmp_path):
    final = tmp_path / "shard-0"
    first, second = staging_dir(str(final)), staging_dir(str(final))
    for staged, text in ((first, "first"), (second, "second")):
        with open(os.path.join(staged, "data"), "w") as f:
            f.write(text)
    assert publish_dir(first, str(final)) is True
    assert publish_dir(second, str(final)) is False
    assert (final / "data").read_text() == "first"
    assert os.listdir(tmp_path) == ["shard-0"]


def test_publish_dir_replace_swaps_the_folder(tmp_path):
    final = tmp_path / "shard-0"
    final.mkdir()
    (final / "old").write_text("old")
    staged = staging_dir(str(final))
    open(os.path.join(staged, "new"), "w").close()
    assert publish_dir(staged, str(final), replace=True) is True
    assert os.listdir(final) == ["new"]


def test_remove_stale_staging_takes_only_staged_names(tmp_path):
    staging_dir(str(tmp_path / "a"))
    with open(os.path.join(tmp_path, ".b.0123abcd.tmp"), "w"):
        pass
    (tmp_path / "keep.tmp").write_text("")  # not hidden: a user's file, not ours
    (tmp_path / ".hidden").write_text("")
    assert remove_stale_staging(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == [".hidden", "keep.tmp"]
