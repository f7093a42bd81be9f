"""DDP scaling on the two-node SLURM dev cluster: two ranks (one per node) against one rank.

Each configuration is a real `sept pretrain` job submitted through submitit to the dev cluster
(`bash slurm/dev-cluster.sh up`), SimCLR with a fixed per-rank batch (weak scaling: two ranks
see twice the images per step), one CPU and one torch thread per rank, gloo all-reduce across
the nodes. Throughput is the job's training images/s over all ranks (from its summary: start-up
and imports excluded). The one-rank job runs before and after the two-rank job and its mean is
the baseline, so drifting load on the machine biases neither side.

Both dev-cluster "nodes" are slurmd daemons on this one machine: they share its cores, so two
ranks can at best double the one-rank rate if two cores are free, and any other process on the
machine takes from the two-rank job first.

    .venv/bin/python benchmarks/pretrain_ddp_scaling.py --workdir /tmp/sept-bench-ddp
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil

from sept.data.demo_corpus import make_demo_corpus
from sept.training.config import load_config
from sept.training.job_shape import JobShape
from sept.training.launcher import launch_pretrain


def run(corpus, workdir: str, name: str, nodes: int, args) -> dict:
    out = os.path.join(workdir, name)
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(
        None,
        dict(
            data=corpus.pool_spec,
            out=out,
            steps=args.steps,
            batch_size=args.batch_size,
            image_size=32,
            width=args.width,
            log_every=1000,
            checkpoint_every=100000,
        ),
    )
    summary = launch_pretrain(
        cfg,
        executor="slurm",
        shape=JobShape(nodes=nodes, tasks_per_node=1, partition=args.partition, cpus_per_task=1, time_min=20),
    )
    print(
        f"  {name}: {nodes} rank(s) on {sorted({r['hostname'] + '/' + str(r['slurm_nodeid']) for r in summary['ranks']})}"
        f" {summary['images_per_s']:.1f} img/s",
        flush=True,
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/sept-bench-ddp")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--partition", default="debug")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    corpus = make_demo_corpus(os.path.join(args.workdir, "corpus"), pool_size=3000, shards=6)
    one_before = run(corpus, args.workdir, "one-rank-before", 1, args)
    two = run(corpus, args.workdir, "two-ranks", 2, args)
    one_after = run(corpus, args.workdir, "one-rank-after", 1, args)
    baseline = (one_before["images_per_s"] + one_after["images_per_s"]) / 2
    print(
        f"one rank:  {baseline:.1f} img/s (before {one_before['images_per_s']:.1f}, after {one_after['images_per_s']:.1f})"
    )
    print(f"two ranks: {two['images_per_s']:.1f} img/s = {two['images_per_s'] / baseline:.2f}x one rank (target 1.7x)")
    waits = [r["data_wait_s"] for r in two["ranks"]]
    print(f"two-rank job: elapsed {two['elapsed_s']:.1f} s, data wait per rank {waits} s")


if __name__ == "__main__":
    main()
