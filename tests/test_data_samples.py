"""Streaming samples out of pool tars: grouping, positions, exact bytes, and damaged tars."""

import io
import os
import tarfile
from pathlib import Path

import pytest

from sept.data.samples import (
    PoolSample,
    ShardStats,
    TruncatedShard,
    image_bytes,
    image_member,
    iter_samples,
)
from sept.errors import SeptError


def _write_tar(path, members):
    """A tar holding ``members`` ((name, bytes) pairs) in exactly this order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


SAMPLE_BYTES = 512 + 1024 + 512 + 512  # a jpg (header + 2 blocks) and a json (header + 1 block)


def _members(n, size=700):
    out = []
    for i in range(n):
        key = f"{i:09d}"
        out += [(f"{key}.jpg", os.urandom(size + i)), (f"{key}.json", b'{"i": %d}' % i)]
    return out


def test_groups_adjacent_members_with_positions_and_exact_bytes(tmp_path):
    members = [
        ("000.jpg", b"\xff\xd8jpeg0"),
        ("000.json", b"{}"),
        ("000.txt", b"a cat"),
        ("001.PNG", b"\x89PNGpng1"),  # extension lowercased
        ("001.json", b"{1}"),
        ("sub/002.seg.png", b"seg"),  # key keeps the folder; extension is all after the first dot
        ("sub/002.webp", b"webp"),
        ("noextension", b"skipped"),
        ("003.jpg", b""),  # zero-byte member is still a member
    ]
    path = _write_tar(tmp_path / "s.tar", members)
    stats = ShardStats()
    samples = list(iter_samples(path, stats))
    assert [(s.key, s.position) for s in samples] == [
        ("000", 0),
        ("001", 1),
        ("sub/002", 2),
        ("003", 3),
    ]
    assert samples[0].members == {"jpg": b"\xff\xd8jpeg0", "json": b"{}", "txt": b"a cat"}
    assert samples[1].members == {"png": b"\x89PNGpng1", "json": b"{1}"}
    assert samples[2].members == {"seg.png": b"seg", "webp": b"webp"}
    assert samples[3].members == {"jpg": b""}
    assert (stats.samples, stats.bad, stats.truncated) == (4, 0, False)


def test_directory_members_are_ignored(tmp_path):
    path = tmp_path / "d.tar"
    with tarfile.open(path, "w") as tar:
        folder = tarfile.TarInfo("images")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        info = tarfile.TarInfo("images/a.jpg")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    assert [(s.key, s.members) for s in iter_samples(str(path))] == [("images/a", {"jpg": b"x"})]


def test_non_adjacent_key_is_an_error_naming_tar_and_key(tmp_path):
    path = _write_tar(
        tmp_path / "bad.tar",
        [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.json", b"3")],
    )
    with pytest.raises(SeptError, match=r"bad\.tar.*'a'.*not adjacent"):
        list(iter_samples(path, ShardStats()))


def test_duplicate_member_in_one_sample_is_an_error(tmp_path):
    path = _write_tar(tmp_path / "dup.tar", [("a.jpg", b"1"), ("a.JPG", b"2")])
    with pytest.raises(SeptError, match=r"dup\.tar.*'a'.*two 'jpg'"):
        list(iter_samples(path))


def test_missing_and_non_tar_shards(tmp_path):
    with pytest.raises(SeptError, match=r"pool shard not found: .*gone\.tar"):
        list(iter_samples(str(tmp_path / "gone.tar")))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(SeptError, match=r"not a tar archive: .*junk\.tar"):
        list(iter_samples(str(junk)))


def test_truncation_at_every_cut_yields_only_complete_samples(tmp_path):
    members = _members(4)
    whole = Path(_write_tar(tmp_path / "whole.tar", members)).read_bytes()
    # offset of the end-of-archive marker: each member is a header block plus padded data
    end = sum(512 + -(-len(data) // 512) * 512 for _, data in members)
    originals = [
        PoolSample(
            key=members[i][0][:9],
            position=i // 2,
            members={"jpg": members[i][1], "json": members[i + 1][1]},
        )
        for i in range(0, len(members), 2)
    ]
    cuts = sorted(set(range(0, end + 1024, 512)) | {1, 300, 700, end - 1, end + 100, len(whole)})
    for cut in cuts:
        path = tmp_path / "cut.tar"
        path.write_bytes(whole[:cut])
        stats = ShardStats()
        got = list(iter_samples(str(path), stats))
        assert got == originals[: len(got)], cut  # a prefix, byte for byte
        damaged = cut < end + 512
        assert stats.truncated == damaged, cut
        assert stats.samples == len(got)
        if damaged:
            assert len(got) < len(originals)  # the sample in progress is never trusted
            assert stats.bad == 1 and "truncated" in stats.bad_samples[0][1]
            if len(got) < len(originals) and cut > 0:
                assert stats.bad_samples[0][0] in ("", originals[len(got)].key)
        else:
            assert len(got) == len(originals) and stats.bad == 0


def test_truncation_without_stats_raises_after_the_complete_samples(tmp_path):
    members = _members(3)
    whole = Path(_write_tar(tmp_path / "whole.tar", members)).read_bytes()
    path = tmp_path / "cut.tar"
    path.write_bytes(whole[: 2 * SAMPLE_BYTES + 512 + 100])  # inside sample 2's jpg data
    seen = []
    with pytest.raises(TruncatedShard, match=r"cut\.tar after 2 complete samples") as err:
        for sample in iter_samples(str(path)):
            seen.append(sample.key)
    assert seen == ["000000000", "000000001"]
    assert isinstance(err.value, SeptError) and err.value.samples_read == 2


def test_corrupt_header_mid_tar_counts_as_damage(tmp_path):
    members = _members(3)
    data = bytearray(Path(_write_tar(tmp_path / "whole.tar", members)).read_bytes())
    third_sample = 2 * SAMPLE_BYTES
    data[third_sample : third_sample + 512] = b"x" * 512  # garbles sample 2's first header
    path = tmp_path / "corrupt.tar"
    path.write_bytes(bytes(data))
    stats = ShardStats()
    # sample 1 may have had more members behind the garbled header, so only sample 0 is trusted
    assert [s.key for s in iter_samples(str(path), stats)] == ["000000000"]
    assert stats.truncated and "corrupt" in stats.bad_samples[0][1]


def test_empty_file_is_a_truncated_shard(tmp_path):
    path = tmp_path / "empty.tar"
    path.write_bytes(b"")
    stats = ShardStats()
    assert list(iter_samples(str(path), stats)) == []
    assert stats.truncated and stats.bad == 1
    with pytest.raises(TruncatedShard):
        list(iter_samples(str(path)))


def test_early_stop_closes_cleanly(tmp_path):
    path = _write_tar(tmp_path / "s.tar", _members(5))
    samples = iter_samples(path)
    assert next(samples).position == 0
    samples.close()


def test_image_member_prefers_image_exts_order():
    sample = PoolSample("k", 0, {"json": b"{}", "png": b"P", "jpg": b"J"})
    assert image_member(sample) == ("jpg", b"J")
    assert image_bytes(sample) == b"J"
    assert image_bytes(PoolSample("k", 0, {"json": b"{}", "seg.png": b"S"})) is None


def test_stats_merge():
    a, b = ShardStats(), ShardStats()
    a.samples, b.samples = 3, 4
    a.add_bad("x", "why")
    b.truncated = True
    b.add_bad("", "truncated shard")
    a.merge(b)
    assert (a.samples, a.bad, a.truncated) == (7, 2, True)
    assert a.bad_samples == [("x", "why"), ("", "truncated shard")]
