"""Data loader throughput against model consumption, at the benchmark's batch size, in one run.

On the demo corpus pool (32 px JPEGs), with the settings a `fast` pre-training uses at its
most expensive stage (full 32 px, full augmentation, hard positive mining over 4 candidate
crop pairs):
  loader: images/s one rank's ``PretrainStream`` delivers (decode, two views, collate), alone,
          with 0 (in-process) and --workers loading processes;
  model:  images/s SimCLR (the default resnet18_small, width 16) consumes on a fixed batch
          (forward, backward, optimizer step), alone, with --threads torch threads;
  both:   a real ``train`` run with --workers loading processes: images/s and the fraction of
          the time the training loop waited for data.
The ratio loader / model says whether loading can keep the model fed; the `both` run says
whether it does on this machine, where loading workers and the model share the same cores.

    .venv/bin/python benchmarks/pretrain_loader_throughput.py --workdir /tmp/sept-bench-loader
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time

import torch

from sept.data.demo_corpus import make_demo_corpus
from sept.data.shards import list_shards
from sept.training.acceleration import AccelerationPlan
from sept.training.augment import ViewAugment
from sept.training.config import load_config
from sept.training.encoder import build_backbone
from sept.training.loader import PretrainStream
from sept.training.methods import build_method
from sept.training.trainer import train


def loader_rate(shards, plan, batch_size: int, workers: int, batches: int) -> float:
    stream = PretrainStream(shards, augment=ViewAugment(32), batch_size=batch_size, num_workers=workers, plan=plan)
    done, epoch, started = 0, 0, None
    while done < batches + 1:
        for _ in stream.epoch(epoch):
            done += 1
            if done == 1:
                started = time.perf_counter()  # workers started and produced their first batch
            if done == batches + 1:
                break
        epoch += 1
    return batches * batch_size / (time.perf_counter() - started)


def model_rate(batch_size: int, width: int, steps: int) -> float:
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18_small", width=width)
    method = build_method("simclr", backbone, dim, temperature=0.2, momentum=0.99)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    x1, x2 = torch.randn(batch_size, 3, 32, 32), torch.randn(batch_size, 3, 32, 32)
    for step in range(steps + 2):
        if step == 2:
            started = time.perf_counter()
        loss = method(x1, x2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/sept-bench-loader")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    corpus = make_demo_corpus(os.path.join(args.workdir, "corpus"), pool_size=3000, shards=6)
    shards = list_shards(corpus.pool_spec)
    cfg = load_config(None, dict(steps=1000, image_size=32, progressive=False), preset="fast")
    plan = AccelerationPlan.from_config(cfg)  # cyclic lr + hard positives at full size and strength

    model = model_rate(args.batch_size, args.width, args.steps)
    loaders = {w: loader_rate(shards, plan, args.batch_size, w, args.batches) for w in (0, args.workers)}
    model_again = model_rate(args.batch_size, args.width, args.steps)
    model = (model + model_again) / 2

    run_dir = os.path.join(args.workdir, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = train(
        load_config(
            None,
            dict(
                data=corpus.pool_spec,
                out=run_dir,
                steps=args.steps * 3,
                batch_size=args.batch_size,
                image_size=32,
                width=args.width,
                num_workers=args.workers,
                log_every=1000,
                checkpoint_every=100000,
            ),
            preset="fast",
        ),
        distributed_run=False,
    )
    rank = summary["ranks"][0]

    print(
        f"model consumes      {model:8.1f} img/s (simclr, width {args.width}, batch {args.batch_size}, "
        f"{args.threads} thread(s); {model_again:.1f} when measured again after the loader)"
    )
    for w, rate in loaders.items():
        label = "in-process" if w == 0 else f"{w} workers"
        print(f"loader ({label:>10}) {rate:8.1f} img/s  = {rate / model:.2f}x what the model consumes (target 1.5x)")
    print(
        f"train, {args.workers} workers:   {summary['images_per_s']:8.1f} img/s, waited for data "
        f"{rank['data_wait_s']:.1f} s of {summary['elapsed_s']:.1f} s ({rank['data_wait_s'] / summary['elapsed_s']:.0%})"
    )


if __name__ == "__main__":
    main()
