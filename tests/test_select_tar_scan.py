"""The header scanner that materialization copies raw tar records with: it must see exactly the samples
``iter_samples`` sees (keys, positions, member bytes) in every tar layout it accepts, and refuse the rest."""

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from sept.data.samples import iter_samples
from sept.data.tar_scan import END_OF_ARCHIVE, UnsupportedTar, copy_records, open_tar, read_members, scan_samples


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "elsewhere"
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _tricky_tar(path: str, fmt: int) -> None:
    long_dir = "d" * 120
    with tarfile.open(path, "w", format=fmt) as tar:
        _add(tar, "a/0001.jpg", b"\xff\xd8" + bytes(range(256)) * 3)
        _add(tar, "a/0001.json", b'{"k": 1}')
        _add(tar, "a/", kind=tarfile.DIRTYPE)  # a directory between samples: skipped
        _add(tar, "README", b"not a sample")  # no KEY.EXT: skipped
        _add(tar, "a/0002.seg.png", b"png" * 1000)  # the extension is everything after the first dot
        _add(tar, "a/0002.link", kind=tarfile.SYMTYPE)  # not a file: skipped, sample continues
        _add(tar, "a/0002.txt", b"")  # an empty member
        _add(tar, f"{long_dir}/0003.jpg", b"x" * 513)  # a long name: ustar prefix, GNU longname or PAX path
        _add(tar, f"{long_dir}/0003.txt", "naïve ünïcode".encode())
        _add(tar, f"{long_dir}/{'k' * 110}.jpg", b"y" * 1024)


def _same_as_iter_samples(path: str) -> list:
    with open_tar(path) as f:
        scanned = [(s.key, s.position, read_members(f, s)) for s in scan_samples(f)]
    assert scanned == [(s.key, s.position, s.members) for s in iter_samples(path)]
    return scanned


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_scan_sees_what_tarfile_sees(tmp_path, fmt):
    path = str(tmp_path / "t.tar")
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold the 110-character base name
        with tarfile.open(path, "w", format=fmt) as tar:
            _add(tar, f"{'d' * 120}/0003.jpg", b"x" * 513)
            _add(tar, "0004.cls", b"3")
    else:
        _tricky_tar(path, fmt)
    assert len(_same_as_iter_samples(path)) >= 2


def test_scan_of_webdataset_shards_and_raw_copy_round_trip(tmp_path):
    src = str(tmp_path / "src.tar")
    with wds.TarWriter(src) as sink:
        for i in range(30):
            sink.write({"__key__": f"s{i:04d}", "jpg": os.urandom(100 + 37 * i), "json": b'{"i": %d}' % i, "txt": b"t"})
    scanned = _same_as_iter_samples(src)
    out = str(tmp_path / "copy.tar")
    with open_tar(src) as f, open(out, "wb") as sink:
        for span in scan_samples(f):
            if span.position % 3 == 0:
                copy_records(f, span, sink)
        sink.write(END_OF_ARCHIVE)
    copied = [(s.key, s.members) for s in iter_samples(out)]
    assert copied == [(k, m) for k, p, m in scanned if p % 3 == 0]


def test_unsupported_tars_are_refused_not_misread(tmp_path):
    src = str(tmp_path / "src.tar")
    with wds.TarWriter(src) as sink:
        for i in range(5):
            sink.write({"__key__": f"s{i}", "jpg": b"j" * 700})
    data = Path(src).read_bytes()
    gz = tmp_path / "src.tar.gz"
    gz.write_bytes(gzip.compress(data))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:3000])  # truncated inside a member
    apart = str(tmp_path / "apart.tar")
    with tarfile.open(apart, "w") as tar:
        _add(tar, "k1.jpg", b"1")
        _add(tar, "k2.jpg", b"2")
        _add(tar, "k1.txt", b"3")  # k1 again, not adjacent
    for bad in (str(gz), str(cut), apart):
        with pytest.raises(UnsupportedTar):
            with open_tar(bad) as f:
                list(scan_samples(f))
