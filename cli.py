"""The `sept` command line: one subcommand per pipeline stage, each a thin layer over a Python function.

Bad input raises SeptError, printed here as one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sept.errors import SeptError

EPILOG = """\
The pipeline, stage by stage:
  sept bootstrap --pool 'pool/{00000..00099}.tar' --out enc.pt
  sept embed     --pool 'pool/{00000..00099}.tar' --encoder enc.pt --out emb.zarr
  sept index     --embeddings emb.zarr --out index.zarr --shards 4
  sept select    --index index.zarr --encoder enc.pt --target mytask/ --budget 100000 --out sel/
  sept pretrain  --data sel/shards --out run/ --executor slurm --nodes 2 --gpus-per-node 8
  sept evaluate  --encoder run/encoder.pt --target mytask/
or all of it on a generated demo corpus:  sept demo
A pool is a brace pattern, a directory of .tar shards or a text file listing shards.
A target task is an ImageFolder directory: train/CLASS/*.jpg and val/CLASS/*.jpg.
"""


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=None,
                   help="address of a running Ray cluster (host:port); default: start Ray locally")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sept", description="Select a task-specific pre-training subset from a huge WebDataset image pool, "
        "then pre-train on it (SEPT).", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole pipeline on a generated demo corpus",
                       description="Make the demo corpus (real handwritten digits mixed with drawn shapes, "
                       "textures and gradients), run every stage on it, and print target accuracy after "
                       "pre-training on the selected subset versus a random subset of the same size.")
    p.add_argument("--workdir", default="work/demo", help="where every stage writes (default: %(default)s)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="where pre-training runs (default: %(default)s)")
    _add_ray(p)

    p = sub.add_parser("bootstrap", help="self-supervised training of the retrieval encoder on a random pool subset",
                       description="SEPT step 1: train the retrieval encoder with self-supervision on a random "
                       "subset of the pool. Users with a strong checkpoint of their own can skip this and pass "
                       "it to --encoder of later stages.")
    p.add_argument("--pool", required=True, help="pool shards: brace pattern, directory or listing file")
    p.add_argument("--out", required=True, help="encoder checkpoint to write (ENCODER.pt)")
    p.add_argument("--sample-size", type=int, default=None, help="pool images in the random subset")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--config", default=None, help="YAML with PretrainConfig fields to override")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("embed", help="embed every pool shard into a Zarr store with Ray actors",
                       description="Ray actors, each holding the encoder once, embed the pool shards into a "
                       "Zarr store. Rerunning skips complete shards; a grown pool embeds only new shards.")
    p.add_argument("--pool", required=True, help="pool shards: brace pattern, directory or listing file")
    p.add_argument("--encoder", required=True, help="sept encoder checkpoint or torchvision state dict")
    p.add_argument("--out", required=True, help="embeddings store to write (EMB.zarr)")
    p.add_argument("--workers", type=int, default=2, help="embedding actors (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-gpus-per-worker", type=float, default=None,
                   help="GPUs each actor reserves (default: 1 if the Ray cluster has GPUs, else 0); "
                   "a GPU requested but not usable is an error, never a silent CPU run")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch threads (and CPUs) per actor")
    p.add_argument("--decode-threads", type=int, default=2,
                   help="image decoding threads per actor, running beside the model (default: %(default)s)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="end non-zero when more than this fraction of samples is bad (default: %(default)s); "
                   "bad samples are listed in EMB.zarr/quarantine.jsonl")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images above this many pixels, before decoding them (decompression bombs)")
    _add_ray(p)

    p = sub.add_parser("index", help="train a FAISS index once and encode its shards in parallel",
                       description="Train the FAISS index on a sample of the embeddings, encode the index "
                       "shards as parallel Ray tasks, and store everything in one Zarr store.")
    p.add_argument("--embeddings", required=True, help="embeddings store from `sept embed`")
    p.add_argument("--out", required=True, help="index store to write (INDEX.zarr)")
    p.add_argument("--factory", default="", help="FAISS factory string, e.g. Flat or IVF1024,PQ32 "
                   "(default: chosen from the pool size)")
    p.add_argument("--shards", type=int, default=2, help="index shards (default: %(default)s)")
    p.add_argument("--metric", choices=["ip", "l2"], default="ip")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists probed per query")
    p.add_argument("--train-size", type=int, default=100_000, help="vectors sampled to train the index")
    _add_ray(p)

    p = sub.add_parser("select", help="retrieve the pool samples nearest to a target task and write them",
                       description="Embed the target's train images, search every index shard, merge the "
                       "per-shard top-k exactly, fill the budget per target image (round robin, deduplicated) "
                       "and write the selected samples as WebDataset shards plus a manifest.")
    p.add_argument("--index", required=True, help="index store from `sept index`")
    p.add_argument("--encoder", required=True, help="the encoder the index was built with")
    p.add_argument("--target", required=True, help="target task: ImageFolder dir with train/ (and val/)")
    p.add_argument("--budget", type=int, required=True, help="number of pool samples to select")
    p.add_argument("--out", required=True, help="selection directory to write")
    p.add_argument("--task", default="", help="task name (default: the target directory's name)")
    p.add_argument("--searchers", type=int, default=None, help="searcher actors (default: one per index shard)")
    _add_ray(p)

    p = sub.add_parser("pretrain", help="self-supervised DDP pre-training launched with submitit",
                       description="Launch self-supervised pre-training with submitit: on this machine "
                       "(--executor local) or on SLURM (--executor slurm). DDP uses gloo on CPU, NCCL on GPU.")
    p.add_argument("--data", required=True, help="training shards: brace pattern, directory or listing file")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, encoder.pt)")
    p.add_argument("--method", choices=["simclr", "moco", "byol", "detcon"], default=None)
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: GPUs per node, or 1)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", type=int, default=60, help="SLURM time limit in minutes")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--config", default=None, help="YAML with PretrainConfig fields")
    p.add_argument("--target", default=None, help="evaluate on this target task when training ends")

    p = sub.add_parser("evaluate", help="linear-probe and kNN accuracy of an encoder on a target task",
                       description="Fit a linear probe and a kNN classifier (k=20, cosine) on frozen features "
                       "of the target's train split and report accuracy on its val split.")
    p.add_argument("--encoder", required=True, help="sept encoder checkpoint or torchvision state dict")
    p.add_argument("--target", required=True, help="target task: ImageFolder dir with train/ and val/")
    return parser


def run(args: argparse.Namespace) -> object:
    cmd = args.command
    if cmd == "demo":
        from sept.demo import run_demo

        return run_demo(args.workdir, executor=args.executor, ray_address=args.ray_address)
    if cmd == "bootstrap":
        from sept.training.bootstrap import bootstrap

        kwargs = {k: v for k, v in dict(sample_size=args.sample_size, steps=args.steps).items() if v is not None}
        return bootstrap(args.pool, args.out, config=args.config, seed=args.seed, **kwargs)
    if cmd == "embed":
        from sept.cluster.embed import EmbedConfig, embed_pool

        extra = {} if args.max_pixels is None else dict(max_pixels=args.max_pixels)
        return embed_pool(EmbedConfig(pool=args.pool, encoder=args.encoder, out=args.out, ray_address=args.ray_address,
                                      workers=args.workers, batch_size=args.batch_size,
                                      num_gpus_per_worker=args.num_gpus_per_worker,
                                      threads_per_worker=args.threads_per_worker, decode_threads=args.decode_threads,
                                      max_bad_fraction=args.max_bad_fraction, **extra))
    if cmd == "index":
        from sept.cluster.index_build import IndexConfig, build_index
        from sept.index.spec import IndexSpec

        spec = IndexSpec(factory=args.factory, metric=args.metric, shards=args.shards, nprobe=args.nprobe,
                         train_size=args.train_size)
        return build_index(IndexConfig(embeddings=args.embeddings, out=args.out, spec=spec, ray_address=args.ray_address))
    if cmd == "select":
        from sept.cluster.select import SelectConfig, select

        return select(SelectConfig(index=args.index, encoder=args.encoder, target=args.target, budget=args.budget,
                                   out=args.out, task=args.task, ray_address=args.ray_address, searchers=args.searchers))
    if cmd == "pretrain":
        from sept.training.config import load_config
        from sept.training.launcher import launch_pretrain

        overrides = {k: v for k, v in dict(data=args.data, out=args.out, method=args.method, steps=args.steps,
                                           batch_size=args.batch_size).items() if v is not None}
        cfg = load_config(args.config, overrides)
        summary = launch_pretrain(cfg, executor=args.executor, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                  tasks_per_node=args.tasks_per_node, partition=args.partition, time_min=args.time,
                                  account=args.account, qos=args.qos, constraint=args.constraint)
        if args.target:
            from sept.training.evaluate import evaluate

            summary = dict(summary, evaluation=evaluate(f"{args.out}/encoder.pt", args.target))
        return summary
    if cmd == "evaluate":
        from sept.training.evaluate import evaluate

        return evaluate(args.encoder, args.target)
    raise AssertionError(cmd)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        result = run(args)
    except SeptError as exc:
        print(f"sept {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sept {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if result is not None and args.command != "demo":
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
