"""Locating samples inside a WebDataset tar by scanning its 512-byte headers, to copy them as raw tar records.

``scan_samples(open_tar(path))`` yields the same samples as ``sept.data.samples.iter_samples`` (same keys,
same positions, same member bytes), but from the headers alone: it seeks past the data of every
member, so a sample that is not wanted is never read, and a wanted one is copied as the exact
bytes of its tar records (headers, data and padding) with ``copy_records``. That keeps Python's
``tarfile`` (a few thousand headers parsed per second per core) off the materialization path.

The scanner follows ``tarfile``'s reading of ustar, GNU long names and PAX ``path``/``size``
records. Anything it does not follow (compression, global PAX headers, sparse files, a bad
checksum, truncation, keys that are not adjacent, a key with two members of one extension)
raises ``UnsupportedTar``: the caller then takes the ``tarfile`` path, which knows the right
error or skip for each.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES, less sparse files (not followed here)
_SUPPORTED = (b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"L", b"K", b"S", b"x", b"g", b"X")
_GNU_TYPES = (b"L", b"K", b"S")


class UnsupportedTar(Exception):
    """The tar uses something the scanner does not follow; read it with ``tarfile`` instead."""


@dataclass
class MemberSpan:
    ext: str
    start: int  # first byte of its records (extended headers included)
    data: int  # first byte of its data
    size: int
    end: int  # one past its last padded data block


@dataclass
class SampleSpan:
    key: str
    position: int
    members: list[MemberSpan] = field(default_factory=list)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Byte ranges of the sample's tar records, adjacent ones merged."""
        out: list[tuple[int, int]] = []
        for m in self.members:
            if out and out[-1][1] == m.start:
                out[-1] = (out[-1][0], m.end)
            else:
                out.append((m.start, m.end))
        return out


def _nts(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field_bytes: bytes) -> int:
    if field_bytes[0] < 0o200:  # the common case: octal digits
        try:
            return int(field_bytes.rstrip(b"\0 ").lstrip(b" ") or b"0", 8)
        except ValueError:
            pass
    if field_bytes[0] in (0o200, 0o377):  # GNU base-256
        value = 0
        for byte in field_bytes[1:]:
            value = (value << 8) + byte
        return -((256 ** (len(field_bytes) - 1)) - value) if field_bytes[0] == 0o377 else value
    text = field_bytes.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise UnsupportedTar("invalid number field") from None


def _checksum_ok(header: bytes) -> bool:
    field_bytes = header[148:156]
    return _number(field_bytes) == sum(header) - sum(field_bytes) + 8 * 32


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] not in (b"", b"\0"):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[space + 1 : pos + length - 1]  # "key=value", without the newline
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


from sept.data.samples import _split_member_name  # noqa: E402  one naming rule for both readers


def _members(buf) -> Iterator[tuple[str, bytes, int, int, int, int]]:
    """(name, type, records start, data start, size, records end) of every member of ``buf``, in order."""
    total = len(buf)
    offset = 0
    pending_name: str | None = None
    pending_size: int | None = None
    records_start: int | None = None
    while True:
        header = buf[offset : offset + BLOCK]
        if len(header) == 0:
            raise UnsupportedTar("no end-of-archive marker")
        if len(header) < BLOCK:
            raise UnsupportedTar("truncated header")
        if header == _ZERO_BLOCK:
            return
        if not _checksum_ok(header):
            raise UnsupportedTar("bad header checksum")
        kind = header[156:157]
        size = _number(header[124:136])
        start = offset if records_start is None else records_start
        data = offset + BLOCK
        if data + size > total:
            raise UnsupportedTar("truncated member data")
        if kind in (b"x", b"X"):
            pax = _pax_records(buf[data : data + size])
            if any(k.startswith("GNU.sparse") for k in pax):
                raise UnsupportedTar("sparse member")
            if "path" in pax:
                pending_name = pax["path"]
            if "size" in pax:
                pending_size = int(pax["size"])
            records_start = start
            offset = data + -(-size // BLOCK) * BLOCK
            continue
        if kind == b"L":
            pending_name = _nts(buf[data : data + size])
            records_start = start
            offset = data + -(-size // BLOCK) * BLOCK
            continue
        if kind == b"K":
            records_start = start
            offset = data + -(-size // BLOCK) * BLOCK
            continue
        if kind in (b"g", b"S"):
            raise UnsupportedTar("global PAX header or sparse member")
        name = _nts(header[0:100])
        prefix = _nts(header[345:500])
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"
        if kind == b"5":
            name = name.rstrip("/")
        if prefix and kind not in _GNU_TYPES:
            name = prefix + "/" + name
        if pending_name is not None:
            name = pending_name
        if pending_size is not None:
            size = pending_size
        pending_name = pending_size = records_start = None
        end = data + (-(-size // BLOCK) * BLOCK if (kind in _REGULAR or kind not in _SUPPORTED) else 0)
        if data + size > total and (kind in _REGULAR or kind not in _SUPPORTED):
            raise UnsupportedTar("truncated member data")
        yield name, kind, start, data, size, end
        offset = end


class RangeReader:
    """A remote tar as a sliceable buffer: each slice is a ranged read through an fsspec file,
    whose read-ahead cache turns the walk over adjacent headers into few large requests."""

    def __init__(self, path: str):
        from sept import storage

        self._file = storage.open_file(path, "rb", cache_type="readahead", block_size=8 << 20)
        self._size = int(self._file.size)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, span: slice) -> bytes:
        start, stop, _ = span.indices(self._size)
        self._file.seek(start)
        return self._file.read(max(0, stop - start))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_tar(path: str):
    """The tar's bytes, memory-mapped (pages are read only where headers or wanted data are), or
    for a URL a ``RangeReader``; either is closed by ``with`` or ``close()``."""
    import mmap

    from sept import storage

    if storage.is_url(path):
        reader = RangeReader(path)
        if not len(reader):
            reader.close()
            raise UnsupportedTar("empty file")
        return reader
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise UnsupportedTar("empty file")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def scan_samples(buf) -> Iterator[SampleSpan]:
    """The samples of an uncompressed tar held in ``buf`` (bytes or mmap), as ``iter_samples`` groups them."""
    head = bytes(buf[:6])
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zXZ\x00":
        raise UnsupportedTar("compressed tar")
    position = 0
    pending: SampleSpan | None = None
    finished: set[str] = set()
    for name, kind, start, data, size, end in _members(buf):
        if kind not in _REGULAR:
            continue
        key, ext = _split_member_name(name)
        if key is None:
            continue
        if pending is None or key != pending.key:
            if key in finished:
                raise UnsupportedTar("members of a key are not adjacent")
            if pending is not None:
                finished.add(pending.key)
                yield pending
                position += 1
            pending = SampleSpan(key=key, position=position)
        elif any(m.ext == ext for m in pending.members):
            raise UnsupportedTar("a key has two members of one extension")
        pending.members.append(MemberSpan(ext=ext, start=start, data=data, size=size, end=end))
    if pending is not None:
        yield pending


def read_members(buf, sample: SampleSpan) -> dict[str, bytes]:
    """The sample's member bytes by extension, exactly as stored."""
    return {m.ext: bytes(buf[m.data : m.data + m.size]) for m in sample.members}


def copy_records(buf, sample: SampleSpan, sink: BinaryIO, digest: hashlib._Hash | None = None) -> int:
    """Append the sample's raw tar records to ``sink`` (and to ``digest``); returns bytes written."""
    written = 0
    for a, b in sample.ranges:
        chunk = buf[a:b]
        sink.write(chunk)
        if digest is not None:
            digest.update(chunk)
        written += len(chunk)
    return written


END_OF_ARCHIVE = bytes(2 * BLOCK)
RECORD = 20 * BLOCK  # tar's default record size: archives are padded to a multiple of it
