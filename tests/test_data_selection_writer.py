"""Byte-exact materialization: extracting selected samples and writing verified shards atomically."""

import os
from pathlib import Path

import pytest
import webdataset as wds

from sept.data.samples import PoolSample, iter_samples
from sept.data.selection_writer import SelectionShardWriter, extract_samples
from sept.errors import SeptError
from sept.io import is_staging_name


@pytest.fixture
def source_shard(tmp_path):
    """A pool shard whose members hold arbitrary bytes, including ones an encoder would touch."""
    path = tmp_path / "pool" / "00000.tar"
    path.parent.mkdir()
    samples = []
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i in range(8):
            members = {
                "jpg": os.urandom(300 + 97 * i),
                "json": b'{"key": "%d", "caption": "caf\xc3\xa9"}' % i,
                "txt.gz": os.urandom(40),  # would be gzipped again by an encoding writer
                "cls": b" 7\n",  # would be re-formatted by an encoding writer
            }
            sink.write({"__key__": f"{i:09d}", **members})
            samples.append(PoolSample(f"{i:09d}", i, members))
    return str(path), samples


def test_extract_yields_selected_samples_unchanged(source_shard):
    path, originals = source_shard
    got = list(extract_samples(path, {6, 1, 3}))
    assert got == [originals[1], originals[3], originals[6]]
    assert list(extract_samples(path, set())) == []


def test_extract_refuses_positions_past_the_end(source_shard):
    path, _ = source_shard
    with pytest.raises(SeptError, match=r"00000\.tar has no sample at 2 selected positions"):
        list(extract_samples(path, {0, 8, 9}))


def test_written_shards_read_back_byte_identical(source_shard, tmp_path):
    path, originals = source_shard
    out = tmp_path / "selected"
    names = []
    with SelectionShardWriter(str(out), maxcount=3) as writer:
        for sample in extract_samples(path, range(8)):
            names.append(writer.write(sample))
    assert names == ["selected-000000.tar"] * 3 + ["selected-000001.tar"] * 3 + ["selected-000002.tar"] * 2
    assert writer.shards == [str(out / n) for n in dict.fromkeys(names)]
    assert sorted(os.listdir(out)) == sorted(dict.fromkeys(names))  # no .tmp left behind
    read_back = [s for shard in writer.shards for s in iter_samples(shard)]
    assert [(s.key, s.members) for s in read_back] == [(s.key, s.members) for s in originals]
    assert writer.samples_written == 8


def test_unfinished_shard_only_exists_under_a_tmp_name(source_shard, tmp_path):
    path, originals = source_shard
    out = tmp_path / "sel"
    writer = SelectionShardWriter(str(out), prefix="part", maxcount=2)
    writer.write(originals[0])
    writer.write(originals[1])
    (staged,) = os.listdir(out)
    assert is_staging_name(staged) and staged.startswith(".part-000000.tar.")
    assert writer.write(originals[2]) == "part-000001.tar"  # the first shard is now finished
    staged, finished = sorted(os.listdir(out))  # a staged name starts with a dot
    assert finished == "part-000000.tar" and is_staging_name(staged) and staged.startswith(".part-000001.tar.")
    writer.close()
    assert sorted(os.listdir(out)) == ["part-000000.tar", "part-000001.tar"]
    writer.close()  # closing twice is harmless


def test_crash_inside_with_leaves_only_finished_shards(source_shard, tmp_path):
    path, originals = source_shard
    out = tmp_path / "sel"
    with pytest.raises(RuntimeError, match="boom"):
        with SelectionShardWriter(str(out), maxcount=2) as writer:
            for sample in originals[:3]:
                writer.write(sample)
            raise RuntimeError("boom")
    assert os.listdir(out) == ["selected-000000.tar"]
    assert [s.key for s in iter_samples(str(out / "selected-000000.tar"))] == [s.key for s in originals[:2]]


def test_keys_must_be_unique_within_a_shard_and_can_be_renamed(source_shard, tmp_path):
    path, originals = source_shard
    with SelectionShardWriter(str(tmp_path / "sel"), maxcount=10) as writer:
        writer.write(originals[0])
        with pytest.raises(ValueError, match="already written"):
            writer.write(originals[0])
        writer.write(originals[0], key="copy_of_0")
        with pytest.raises(ValueError, match="without dots"):
            writer.write(originals[1], key="bad.key")
    read_back = list(iter_samples(writer.shards[0]))
    assert [s.key for s in read_back] == ["000000000", "copy_of_0"]
    assert read_back[1].members == originals[0].members


def test_maxsize_rolls_over_and_output_is_deterministic(source_shard, tmp_path):
    path, originals = source_shard
    outputs = []
    for run in ("a", "b"):
        with SelectionShardWriter(str(tmp_path / run), maxcount=100, maxsize=1000) as writer:
            for sample in originals:
                writer.write(sample)
        outputs.append([Path(p).read_bytes() for p in writer.shards])
    assert len(outputs[0]) > 1  # each shard stops once it holds 1000 bytes of members
    assert outputs[0] == outputs[1]


def test_verification_catches_a_shard_that_reads_back_differently(source_shard, tmp_path):
    from sept.data.selection_writer import ShardVerificationError, _digests, _verify_shard

    path, originals = source_shard
    expected = [(s.key, _digests(s.members)) for s in originals]
    _verify_shard(path, expected)  # the source itself matches
    tampered = [*expected[:-1], (expected[-1][0], {**expected[-1][1], "jpg": "0" * 32})]
    with pytest.raises(ShardVerificationError, match="from sample 7"):
        _verify_shard(path, tampered)
    with pytest.raises(ShardVerificationError, match="8 samples read, 9 written"):
        _verify_shard(path, expected + expected[:1])


def test_raw_records_and_samples_share_one_writer(source_shard, tmp_path):
    """The raw-record copy (materialization's fast path) and ``write`` go through the same writer:
    the same part naming, a new part on a repeated key, and each part's recorded size and hash."""
    from sept.data.tar_scan import open_tar, scan_samples
    from sept.io import file_digest

    path, originals = source_shard
    out = tmp_path / "parts"
    with SelectionShardWriter(str(out), prefix="part", maxcount=10, new_part_on_repeated_key=True) as writer:
        with open_tar(path) as f:
            spans = list(scan_samples(f))
            names = [writer.write_records(f, span) for span in spans[:3]]
            names.append(writer.write_records(f, spans[0]))  # the same key again: a new part
        names.append(writer.write(originals[5]))
    assert names == ["part-000000.tar"] * 3 + ["part-000001.tar"] * 2
    for part, size, sha in writer.parts:
        assert file_digest(part) == (size, sha)
    read_back = [(s.key, s.members) for shard in writer.shards for s in iter_samples(shard)]
    expected = [originals[i] for i in (0, 1, 2, 0, 5)]
    assert read_back == [(s.key, s.members) for s in expected]
    with SelectionShardWriter(str(tmp_path / "strict"), maxcount=10) as strict:
        strict.write(originals[0])
        with pytest.raises(ValueError, match="already written"):
            strict.write(originals[0])


def test_the_catalog_reads_every_done_marker_into_columns_and_a_later_job_wins(tmp_path):
    """The catalog holds copied samples as sorted columns, not a dict each: ``row`` gives back exactly
    what a job's marker wrote, ``has`` answers for many ids at once, and an id that two markers
    name keeps the later job's row (as the dict filled job by job did)."""
    import json

    import numpy as np

    from sept.data.selection_folder import CATALOG, read_catalog

    def row(i, key, part, source="/pool/00000.tar", members=("cls", "jpg")):
        return dict(
            id=i,
            key=key,
            shard=part,
            source_shard=source,
            source_index=i >> 32,
            position=i & 0xFFFFFFFF,
            members=list(members),
            sha256=f"{i:0{16 + i % 3}x}",  # digests need not be of one width
        )

    early = [row(7, "a", "part-a-000000.tar"), row(3, "kéy/with-slash", "part-a-000000.tar", members=("png",))]
    late = [row((1 << 32) + 5, "zz", "part-b-000000.tar", "/pool/00001.tar"), row(7, "a-again", "part-b-000000.tar")]
    folder = tmp_path / CATALOG
    folder.mkdir()
    for job, rows in (("a", early), ("b", late)):
        parts = {r["shard"]: dict(size=10, sha256="0" * 64) for r in rows}
        (folder / f"{job}.json").write_text(json.dumps(dict(job=job, rows=rows, parts=parts)))
    (folder / "notes.txt").write_text("not a marker")
    catalog = read_catalog(str(tmp_path))
    assert catalog.ids.tolist() == [3, 7, (1 << 32) + 5] and len(catalog) == 3
    assert catalog.row(3) == early[1] and catalog.row(7) == late[1] and catalog.row((1 << 32) + 5) == late[0]
    assert catalog.has(np.array([7, 8, 3, -1])).tolist() == [True, False, True, False]
    assert catalog.jobs == ["a", "b"] and sorted(catalog.parts) == ["part-a-000000.tar", "part-b-000000.tar"]
    with pytest.raises(KeyError):
        catalog.row(8)
    empty = tmp_path / "empty"
    (empty / CATALOG).mkdir(parents=True)
    assert len(read_catalog(str(empty))) == 0 and not read_catalog(str(empty)).has(np.array([1])).any()
