"""embed_shard without Ray: parallel decoding keeps tar order, bad samples are counted by kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_embed_pools import BAD_IN_SHARD, write_bad_kinds_shard, write_good_shard, write_truncated_shard

from sept.data.decode import decode_sample
from sept.data.embed_shard import BAD_KINDS, bad_kind, embed_shard
from sept.data.identity import split_ids
from sept.data.samples import ShardStats, iter_samples
from sept.errors import SeptError
from sept.training.encoder import build_backbone, load_encoder, save_encoder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18_small", width=4)
    path = str(tmp_path_factory.mktemp("enc") / "enc.pt")
    save_encoder(path, backbone, arch="resnet18_small", image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    return load_encoder(path, device="cpu")


def _sequential(encoder, path):
    """The plain reference: decode one by one in tar order, embed one at a time."""
    stats, xs, positions = ShardStats(), [], []
    for sample in iter_samples(path, stats):
        image = decode_sample(sample, stats)
        if image is not None:
            xs.append(encoder.embed(encoder.preprocess(image)[None])[0])
            positions.append(sample.position)
    return np.array(xs), positions


@pytest.mark.parametrize("batch_size, threads", [(1, 1), (3, 4), (64, 2)])
def test_parallel_decoding_keeps_tar_order_and_values(encoder, tmp_path, batch_size, threads):
    path = str(tmp_path / "pool.tar")
    write_good_shard(path, 9, seed=3)
    x, ids, _, report = embed_shard(encoder, path, 5, batch_size=batch_size, decode_threads=threads)
    ref, positions = _sequential(encoder, path)
    shard, pos = split_ids(ids)
    assert shard.tolist() == [5] * 9 and pos.tolist() == positions == list(range(9))
    np.testing.assert_allclose(x, ref, atol=1e-5)
    assert report["samples"] == 9 and report["bad"] == 0


def test_one_of_each_bad_kind_is_skipped_and_counted(encoder, tmp_path):
    path = str(tmp_path / "kinds.tar")
    good = write_bad_kinds_shard(path)
    x, ids, _, report = embed_shard(encoder, path, 0, batch_size=2, decode_threads=3)
    assert len(ids) == x.shape[0] == good
    assert split_ids(ids)[1].tolist() == [0, 2, 6]  # the good samples' positions in the tar
    assert report["bad"] == len(BAD_IN_SHARD)
    assert {key: bad_kind(reason) for key, reason in report["bad_samples"]} == BAD_IN_SHARD
    assert report["bad_kinds"] == {k: int(k in BAD_IN_SHARD.values()) for k in BAD_KINDS}
    trunc = str(tmp_path / "trunc.tar")
    kept = write_truncated_shard(trunc)
    _, ids, _, report = embed_shard(encoder, trunc, 1, batch_size=2)
    assert len(ids) == kept and report["truncated"]
    assert report["bad_kinds"]["truncated"] == 1 and report["bad"] == 1


def test_small_pixel_limit_refuses_before_decoding(encoder, tmp_path):
    path = str(tmp_path / "pool.tar")
    write_good_shard(path, 3, seed=1, size=32)
    _, ids, _, report = embed_shard(encoder, path, 0, max_pixels=32 * 32 - 1)
    assert len(ids) == 0 and report["bad_kinds"]["too_large"] == 3


def test_shard_level_fault_propagates_from_the_reader_thread(encoder, tmp_path):
    from test_embed_pools import write_non_adjacent_shard

    path = str(tmp_path / "split.tar")
    write_non_adjacent_shard(path)
    with pytest.raises(SeptError, match=r"split\.tar.*'split_key'.*not adjacent"):
        embed_shard(encoder, path, 0, batch_size=1)
