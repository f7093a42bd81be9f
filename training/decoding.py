"""From a pool sample to what a batch is made of: its decoded image and, for DetCon, its
segment label map (``DecodedSample``), or a skip record when the sample is bad.

``SampleCache`` holds shards read whole and the images decoded from them while they fit in its
byte limit, so a training set that fits in memory (a task's selection is typical) is read from
its shards and decoded once, then served from memory epoch after epoch. Cached or not, the
stream yields the same batches. Only the one-worker plan keeps a cache: DataLoader workers live
for one epoch, so a cache there would be filled and thrown away every epoch.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from sept.data.decode import decode_sample
from sept.data.identity import make_ids
from sept.data.samples import PoolSample, ShardStats
from sept.training.augment import as_uint8

MASK_MEMBER = "mask.png"
"""The WebDataset member holding a sample's segmentation label map (``sept.data.masks``)."""


class DecodedSample(NamedTuple):
    """A good sample, ready to be augmented into a batch."""

    sample_id: int
    """``sept.data.identity.make_ids`` of its listing index and position."""
    key: str
    image: torch.Tensor
    """uint8 [3, H, W]."""
    mask: torch.Tensor | None
    """uint8 [H, W] segment labels (DetCon), else None."""


def decode_mask(sample: PoolSample, size: tuple[int, int]) -> np.ndarray:
    """The sample's uint8 label map, which must be ``size`` (width, height) like its image;
    ValueError (a bad sample) otherwise."""
    data = sample.members.get(MASK_MEMBER)
    if data is None:
        raise ValueError(f"no {MASK_MEMBER} member (compute masks with sept.data.masks)")
    try:
        mask = np.asarray(Image.open(io.BytesIO(data)))
    except Exception as err:  # untrusted bytes: any decoder failure is a bad sample
        raise ValueError(f"undecodable {MASK_MEMBER}: {type(err).__name__}") from None
    if mask.ndim != 2 or mask.shape != (size[1], size[0]):
        raise ValueError(f"{MASK_MEMBER} of shape {mask.shape} does not match the {size[0]}x{size[1]} image")
    return mask.astype(np.uint8, copy=False)


class SampleCache:
    """Samples of shards read whole and their decoded images, kept while they fit in ``limit`` bytes.

    Counted: every member's bytes and every decoded image's pixels. The first entry that would
    pass the limit stops the filling; what is in stays and is still served."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.used = 0
        self.full = self.limit <= 0
        self.shards: dict[int, list[PoolSample]] = {}
        """Listing index -> the shard's wanted samples in tar order."""
        self.images: dict[tuple[int, int], tuple[torch.Tensor | None, list[tuple[str, str]]]] = {}
        """(listing index, position) -> (decoded uint8 image [3, H, W] or None, bad records of the decode)."""

    def _admit(self, nbytes: int) -> bool:
        if self.full or self.used + nbytes > self.limit:
            self.full = True
            return False
        self.used += nbytes
        return True

    def keep_shard(self, shard_index: int, samples: list[PoolSample]) -> None:
        if self._admit(sum(len(v) for s in samples for v in s.members.values())):
            self.shards[shard_index] = samples

    def keep_image(self, key: tuple[int, int], image: torch.Tensor | None, bad: list[tuple[str, str]]) -> None:
        nbytes = 0 if image is None else image.numel() * image.element_size()
        if self._admit(nbytes):
            self.images[key] = (image, bad)

    def decoded(self, shard_index: int, sample: PoolSample) -> tuple[torch.Tensor | None, list[tuple[str, str]]]:
        """The sample's uint8 image [3, H, W] (None if bad) and its skip records, from the cache
        when it holds them, else decoded (and offered to the cache)."""
        key = (shard_index, sample.position)
        if (hit := self.images.get(key)) is not None:
            return hit
        stats = ShardStats()
        decoded = decode_sample(sample, stats)
        image = None if decoded is None else as_uint8(decoded)
        bad = list(stats.bad_samples)
        self.keep_image(key, image, bad)
        return image, bad


def decode_for_batch(
    cache: SampleCache, shard_index: int, sample: PoolSample, bad: list[tuple[str, str]], *, with_mask: bool
) -> DecodedSample | None:
    """The ``DecodedSample`` of a good sample; None (and its skip records appended to ``bad``)
    for a bad one."""
    image, decode_bad = cache.decoded(shard_index, sample)
    if image is None:
        bad.extend(decode_bad)
        return None
    sample_id = int(make_ids(shard_index, [sample.position])[0])
    mask = None
    if with_mask:
        try:
            mask = torch.from_numpy(decode_mask(sample, (image.shape[2], image.shape[1])).copy())
        except ValueError as err:
            bad.append((sample.key, str(err)))
            return None
    return DecodedSample(sample_id, sample.key, image, mask)
