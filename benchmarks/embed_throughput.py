"""Embedding throughput of `sept embed` against a bare single-process loop, in the same run.

Both sides use the same encoder file, decoder (sept.data.decode), preprocessing, batch size and
shards. The bare loop reads, decodes, preprocesses and embeds one image after another in one
process with one torch thread. `sept embed` runs with 1 and then 2 Ray actors (one torch thread
each, decoding on threads beside the model) on a local Ray instance started once beforehand.
Its rate is measured from the first actor ready to the last shard written (actor start-up,
which a long run pays once, is reported apart). The bare loop runs before and after, and its
mean is the baseline.

    .venv/bin/python benchmarks/embed_throughput.py --workdir /tmp/sept-bench-embed
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import time

import numpy as np
import torch
import webdataset as wds
from PIL import Image


def make_pool(root: str, shards: int, per_shard: int, size: int) -> str:
    """JPEG shards of smooth random images (realistic decode cost, unlike noise)."""
    pool = os.path.join(root, "pool")
    if os.path.isdir(pool) and len(os.listdir(pool)) == shards:
        return pool
    os.makedirs(pool, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        with wds.TarWriter(os.path.join(pool, f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{s:05d}_{i:05d}", "jpg": buf.getvalue(), "json": b"{}"})
    return pool


def bare_loop(encoder_path: str, pool: str, batch_size: int) -> tuple[int, float]:
    """(images, seconds): the simplest correct loop, one process, one torch thread."""
    from sept.data.decode import decode_sample
    from sept.data.samples import ShardStats, iter_samples
    from sept.data.shards import list_shards
    from sept.training.encoder import load_encoder

    torch.set_num_threads(1)
    encoder = load_encoder(encoder_path, device="cpu")
    n, start = 0, time.perf_counter()
    for shard in list_shards(pool):
        stats, batch = ShardStats(), []
        for sample in iter_samples(shard, stats):
            image = decode_sample(sample, stats)
            if image is None:
                continue
            batch.append(encoder.preprocess(image))
            if len(batch) == batch_size:
                encoder.embed(torch.stack(batch))
                n, batch = n + len(batch), []
        if batch:
            encoder.embed(torch.stack(batch))
            n += len(batch)
    return n, time.perf_counter() - start


def sept_embed(encoder_path: str, pool: str, out: str, workers: int, batch_size: int, decode_threads: int) -> dict:
    from sept.cluster.embed import EmbedConfig, embed_pool

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = embed_pool(
        EmbedConfig(
            pool=pool,
            encoder=encoder_path,
            out=out,
            workers=workers,
            batch_size=batch_size,
            threads_per_worker=1,
            decode_threads=decode_threads,
            num_gpus_per_worker=0,
        )
    )
    summary["wall"] = time.perf_counter() - start
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/sept-bench-embed")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--image-px", type=int, default=96, help="stored JPEG size")
    parser.add_argument("--input-px", type=int, default=64, help="encoder input size")
    parser.add_argument("--width", type=int, default=16, help="resnet18_small base width")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decode-threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from sept.cluster.runtime import ray_session
    from sept.training.encoder import build_backbone, save_encoder

    os.makedirs(args.workdir, exist_ok=True)
    pool = make_pool(args.workdir, args.shards, args.per_shard, args.image_px)
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18_small", width=args.width)
    encoder = save_encoder(
        os.path.join(args.workdir, "enc.pt"),
        backbone,
        arch="resnet18_small",
        image_size=args.input_px,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    print(
        f"pool: {args.shards} shards x {args.per_shard} JPEGs of {args.image_px}px; resnet18_small width "
        f"{args.width} at {args.input_px}px; batch {args.batch_size}; {os.cpu_count()} CPU(s)"
    )
    n0, s0 = bare_loop(encoder, pool, args.batch_size)
    runs = {}
    with ray_session(None, num_cpus=os.cpu_count()):
        for workers in (1, 2):
            runs[workers] = sept_embed(
                encoder,
                pool,
                os.path.join(args.workdir, f"emb{workers}.zarr"),
                workers,
                args.batch_size,
                args.decode_threads,
            )
    n1, s1 = bare_loop(encoder, pool, args.batch_size)
    bare = (n0 + n1) / (s0 + s1)
    print(f"\n{'run':<28} {'images/s':>9} {'vs bare':>8} {'wall s':>8}")
    print(f"{'bare loop, before':<28} {n0 / s0:>9.1f} {n0 / s0 / bare:>8.2f} {s0:>8.1f}")
    print(f"{'bare loop, after':<28} {n1 / s1:>9.1f} {n1 / s1 / bare:>8.2f} {s1:>8.1f}")
    for workers, summary in runs.items():
        rate = summary["images_per_second"]
        print(
            f"{f'sept embed, {workers} worker(s)':<28} {rate:>9.1f} {rate / bare:>8.2f} {summary['wall']:>8.1f}"
            f"   (end to end with actor start-up: {summary['vectors'] / summary['wall']:.1f} images/s)"
        )
    print(
        f"\nratio sept embed / bare loop: 1 worker {runs[1]['images_per_second'] / bare:.2f}, "
        f"2 workers {runs[2]['images_per_second'] / bare:.2f}"
    )


if __name__ == "__main__":
    main()
