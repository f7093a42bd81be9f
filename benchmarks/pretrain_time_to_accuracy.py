"""Time to accuracy: the `fast` preset (arXiv 2212.05611's strategies) against plain SimCLR.

On the demo corpus (a pool of four visual domains: digits, shapes, textures, gradients), both
arms pre-train on the pool's first shards; the last shard is held out. Accuracy is kNN (k=20,
cosine, temperature-weighted) of the domain of held-out pool images: half of the held-out shard
is the kNN's reference set, half is scored. (The demo's digits target task is not used: at this
scale neither arm moves its kNN accuracy off chance, so there is no time to accuracy to measure.)
For each seed:
  baseline: plain SimCLR, cosine learning rate over --steps steps; its kNN accuracy at the end is
            the bar;
  fast:     the same method, optimizer, batch and peak learning rate with the `fast` preset
            (cyclic learning rate with --cycle-steps per cycle, progressive resolution and
            augmentation, hard positive mining), extended one cycle at a time (the cyclic
            schedule makes each extension the exact continuation of the run) and evaluated at
            every cycle's end, up to --steps.
Reported per seed: the first cycle end at which fast reaches the bar, and the speed-up in steps
(baseline steps / fast steps) and in training wall time; then the mean and spread over seeds.
A seed whose fast arm never reaches the bar within --steps counts as a speed-up of 1 (an upper
bound for it).

    .venv/bin/python benchmarks/pretrain_time_to_accuracy.py --workdir /tmp/sept-bench-tta
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time

import numpy as np
import torch

from sept.data.decode import decode_sample
from sept.data.demo_corpus import make_demo_corpus
from sept.data.samples import ShardStats, iter_samples
from sept.data.shards import list_shards
from sept.training.config import load_config
from sept.training.encoder import IMAGENET_MEAN, IMAGENET_STD, build_backbone, load_encoder, save_encoder
from sept.training.evaluate import knn_accuracy
from sept.training.trainer import train


def held_out_domains(corpus, shard: str) -> tuple[list, np.ndarray]:
    """Images of one pool shard and their domain index (from the corpus's truth file)."""
    truth = corpus.truth()
    domains = sorted(set(truth.values()))
    images, labels = [], []
    for sample in iter_samples(shard):
        image = decode_sample(sample, ShardStats())
        if image is not None:
            images.append(image)
            labels.append(domains.index(truth[sample.key]))
    return images, np.asarray(labels)


def knn_score(encoder_path: str, images: list, labels: np.ndarray) -> float:
    """kNN accuracy on the odd-indexed images with the even-indexed ones as reference."""
    features = load_encoder(encoder_path, device="cpu").embed_images(images)
    return knn_accuracy(features[0::2], labels[0::2], features[1::2], labels[1::2], k=20)


def run_seed(args, train_shards: str, held_out: tuple, seed: int) -> dict:
    common = dict(data=train_shards, method="simclr", image_size=32, width=args.width, batch_size=args.batch_size,
                  optimizer="adamw", lr=args.lr, warmup_steps=args.warmup, seed=seed, log_every=50,
                  checkpoint_every=10_000)
    base_dir = os.path.join(args.workdir, f"seed{seed}", "baseline")
    fast_dir = os.path.join(args.workdir, f"seed{seed}", "fast")
    for d in (base_dir, fast_dir):
        shutil.rmtree(d, ignore_errors=True)

    started = time.perf_counter()
    train(load_config(None, {**common, "out": base_dir, "steps": args.steps}), distributed_run=False)
    base_wall = time.perf_counter() - started
    bar = knn_score(os.path.join(base_dir, "encoder.pt"), *held_out)

    curve, fast_wall, reached = [], 0.0, None
    for end in range(args.cycle_steps, args.steps + 1, args.cycle_steps):
        cfg = load_config(None, {**common, "out": fast_dir, "steps": end, "cycle_steps": args.cycle_steps}, preset="fast")
        started = time.perf_counter()
        train(cfg, distributed_run=False)
        fast_wall += time.perf_counter() - started
        accuracy = knn_score(os.path.join(fast_dir, "encoder.pt"), *held_out)
        curve.append((end, accuracy, round(fast_wall, 2)))
        print(f"  seed {seed}: fast at {end:4d} steps kNN {accuracy:.3f} (baseline {bar:.3f} at {args.steps})", flush=True)
        if reached is None and accuracy >= bar:
            reached = (end, fast_wall)
            if not args.full_curve:
                break
    result = {"seed": seed, "baseline_steps": args.steps, "baseline_knn": bar, "baseline_wall_s": round(base_wall, 2),
              "fast_curve": curve}
    if reached:
        result.update(fast_steps=reached[0], fast_wall_s=round(reached[1], 2),
                      step_speedup=args.steps / reached[0], wall_speedup=base_wall / reached[1])
    else:
        result.update(fast_steps=None, step_speedup=None, wall_speedup=None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/sept-bench-tta")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120, help="baseline steps (and the fast arm's limit)")
    parser.add_argument("--cycle-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--pool-size", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--full-curve", action="store_true", help="train the fast arm to --steps even after it reaches the bar")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    corpus = make_demo_corpus(os.path.join(args.workdir, "corpus"), pool_size=args.pool_size, shards=4)
    shards = list_shards(corpus.pool_spec)
    held_out = held_out_domains(corpus, shards[-1])
    untrained = os.path.join(args.workdir, "untrained.pt")
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18_small", width=args.width)
    save_encoder(untrained, backbone, arch="resnet18_small", image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    print(f"held-out domain kNN of an untrained encoder: {knn_score(untrained, *held_out):.3f}", flush=True)
    listing = os.path.join(args.workdir, "train-shards.txt")
    with open(listing, "w") as f:
        f.write("\n".join(shards[:-1]) + "\n")
    results = [run_seed(args, listing, held_out, seed) for seed in args.seeds]

    print(f"\n{'seed':>4} {'baseline kNN':>12} {'fast steps':>10} {'step speed-up':>13} {'wall speed-up':>13}")
    for r in results:
        steps = r["fast_steps"] if r["fast_steps"] is not None else f">{args.steps}"
        su = f"{r['step_speedup']:.2f}x" if r["step_speedup"] else "<=1x"
        wu = f"{r['wall_speedup']:.2f}x" if r["wall_speedup"] else "-"
        print(f"{r['seed']:>4} {r['baseline_knn']:>12.3f} {steps:>10} {su:>13} {wu:>13}")
    # A seed that never reached the bar is counted at a speed-up of 1 (an upper bound for it).
    speedups = np.array([r["step_speedup"] or 1.0 for r in results])
    walls = np.array([r["wall_speedup"] or 1.0 for r in results])
    print(f"step speed-up: mean {speedups.mean():.2f}x, min {speedups.min():.2f}x, max {speedups.max():.2f}x, "
          f"std {speedups.std():.2f} over {len(results)} seeds (target: 2.7x)")
    print(f"wall speed-up: mean {walls.mean():.2f}x, min {walls.min():.2f}x, max {walls.max():.2f}x")
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
