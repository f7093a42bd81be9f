"""DetCon: Felzenszwalb masks stored as a WebDataset member, mask pooling and the mask-level
contrastive loss against naive references, and DetCon-S/B losses falling on a small run."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, ImageDraw

from sept.data.masks import MASK_EXT, MaskParams, add_masks, decode_mask, felzenszwalb_labels, has_masks
from sept.data.samples import iter_samples
from sept.data.shards import list_shards
from sept.training.augment import ViewAugment
from sept.training.detcon import detcon_loss, mask_pool
from sept.training.encoder import build_backbone
from sept.training.loader import PretrainStream
from sept.training.methods import build_method

torch.set_num_threads(1)


def shapes_image(rng, size=32):
    """A flat background with three filled shapes: clear segments for Felzenszwalb–Huttenlocher."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, size - 10, 2))
        w, h = (int(v) for v in rng.integers(6, 14, 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def make_shapes_pool(directory, shard_sizes, size=32, bad=()):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for shard, count in enumerate(shard_sizes):
        with wds.TarWriter(str(directory / f"{shard:05d}.tar")) as writer:
            for i in range(count):
                buffer = io.BytesIO()
                shapes_image(rng, size).save(buffer, "PNG")
                data = b"broken" if (shard, i) in bad else buffer.getvalue()
                writer.write({"__key__": f"{shard:05d}{i:04d}", "png": data, "json": b"{}"})
    return str(directory)


def test_masks_are_stored_next_to_each_image_and_skipped_on_rerun(tmp_path):
    pool = list_shards(make_shapes_pool(tmp_path / "pool", [6, 5], bad={(1, 2)}))
    assert not has_masks(pool)
    out = add_masks(pool, str(tmp_path / "masked"), workers=2)
    assert has_masks(out)
    for src, dst in zip(pool, out):
        originals, copies = list(iter_samples(src)), list(iter_samples(dst))
        assert [s.key for s in originals] == [s.key for s in copies]
        for original, copy in zip(originals, copies):
            assert copy.members["png"] == original.members["png"]  # the image bytes are untouched
            if original.key == "000010002":
                assert MASK_EXT not in copy.members  # undecodable: copied, no mask
                continue
            labels = decode_mask(copy.members[MASK_EXT])
            image = np.asarray(Image.open(io.BytesIO(original.members["png"])).convert("RGB"))
            assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
            assert np.array_equal(labels, felzenszwalb_labels(image))
            assert 2 <= len(np.unique(labels)) <= 64
    mtimes = [p for p in out]
    stamp = [(tmp_path / "masked" / p.rsplit("/", 1)[1]).stat().st_mtime_ns for p in mtimes]
    assert add_masks(pool, str(tmp_path / "masked"), workers=0) == out
    assert [(tmp_path / "masked" / p.rsplit("/", 1)[1]).stat().st_mtime_ns for p in mtimes] == stamp


def test_felzenszwalb_parameters_follow_the_image_area():
    assert MaskParams().for_image(224, 224) == (1000.0, 0.8, 784)
    assert MaskParams().for_image(32, 32)[2] == 16
    labels = felzenszwalb_labels(np.asarray(shapes_image(np.random.default_rng(1))))
    assert labels.min() == 0 and labels.max() >= 1


def test_mask_pool_matches_a_per_segment_average():
    torch.manual_seed(0)
    features = torch.randn(2, 5, 4, 4)
    labels = torch.randint(0, 3, (2, 8, 8), dtype=torch.uint8)
    labels[1][labels[1] == 2] = 1  # image 1 has no segment 2
    ids = torch.tensor([[0, 2, -1], [1, 2, 0]])
    pooled, valid = mask_pool(features, labels, ids)
    assert valid.tolist() == [[True, True, False], [True, False, True]]
    for b in range(2):
        for k in range(3):
            if not valid[b, k]:
                continue
            cover = (labels[b] == ids[b, k]).float().reshape(4, 2, 4, 2).mean(dim=(1, 3))  # share of each cell
            expected = (features[b] * cover).sum(dim=(1, 2)) / cover.sum()
            assert torch.allclose(pooled[b, k], expected, atol=1e-5)


def test_detcon_loss_matches_a_per_query_reference():
    torch.manual_seed(1)
    q, keys = torch.randn(6, 4), torch.randn(9, 4)
    positives = torch.tensor([0, 2, 3, 5, 6, 8])
    query_valid = torch.tensor([True, True, False, True, True, True])
    key_valid = torch.tensor([True, True, True, True, False, True, True, True, False])
    ours = detcon_loss(q, keys, positives, query_valid, key_valid, 0.1)
    qn, kn = F.normalize(q, dim=1), F.normalize(keys, dim=1)
    terms = []
    for i in range(6):
        if not query_valid[i] or not key_valid[positives[i]]:
            continue  # query 2 is invalid, query 5's positive (key 8) is invalid
        logits = torch.stack([qn[i] @ kn[j] / 0.1 for j in range(9) if key_valid[j]])
        positive = [j for j in range(9) if key_valid[j]].index(int(positives[i]))
        terms.append(torch.logsumexp(logits, 0) - logits[positive])
    assert len(terms) == 4
    assert torch.allclose(ours, torch.stack(terms).mean(), atol=1e-5)


@pytest.mark.parametrize("name", ["detcon_s", "detcon_b"])
def test_detcon_loss_falls_on_masked_batches(tmp_path, name):
    masked = add_masks(list_shards(make_shapes_pool(tmp_path / "pool", [16])), str(tmp_path / "masked"), workers=0)
    stream = PretrainStream(masked, augment=ViewAugment(32, color_jitter=0.4), batch_size=8, num_masks=16)
    batches = list(stream.epoch(0))
    assert len(batches) == 2 and all((b.mask_ids >= 0).sum(dim=1).min() >= 2 for b in batches)
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18_small", width=8)
    method = build_method(name, backbone, dim, temperature=0.2, momentum=0.9, detcon_temperature=0.1)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for step in range(20):
        b = batches[step % 2]
        loss = method(b.view1, b.view2, b.mask1, b.mask2, b.mask_ids)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.momentum_update((step + 1) / 20)
        losses.append(loss.item())
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses


def test_sept_pretrain_method_detcon_computes_masks_and_trains(tmp_path):
    import json
    import os

    from conftest import run_sept

    from sept.training.run_logs import read_step_csv

    pool = make_shapes_pool(tmp_path / "pool", [8, 8])
    config = tmp_path / "detcon.yaml"
    config.write_text("image_size: 32\nwidth: 8\nlog_every: 1\noptimizer: adamw\nlr: 0.002\n")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one compute thread: the test machine's cores are shared
    proc = run_sept(
        "pretrain",
        "--data",
        pool,
        "--out",
        str(run),
        "--method",
        "detcon",
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--config",
        str(config),
        env=env,
        timeout=300,
    )
    summary = json.loads(proc.stdout)
    assert summary["method"] == "detcon_s" and summary["steps"] == 6
    masked = list_shards(str(run / "masked-shards"))
    assert len(masked) == 2 and all(MASK_EXT in s.members for p in masked for s in iter_samples(p))
    losses = [float(r["loss"]) for r in read_step_csv(str(run / "metrics.csv"))]
    assert len(losses) == 6 and all(np.isfinite(losses))
