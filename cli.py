"""The `sept` command line: one subcommand per pipeline stage, each a thin layer over a Python function.

Bad input raises SeptError, printed here as one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sept.errors import SeptError, first_line, task_cause

EPILOG = """\
The pipeline, stage by stage:
  sept bootstrap --pool 'pool/{00000..00099}.tar' --out enc.pt
  sept embed     --pool 'pool/{00000..00099}.tar' --encoder enc.pt --out emb.zarr
  sept index     --embeddings emb.zarr --out index.zarr --shards 4
  sept select    --index index.zarr --encoder enc.pt --target mytask/ --budget 100000 --out sel/
  sept report    --selection sel/ --out sel/report
  sept pretrain  --data sel/tasks/mytask --out run/ --executor slurm --nodes 2 --gpus-per-node 8
  sept evaluate  --encoder run/encoder.pt --target mytask/
Bring your own retrieval encoder instead of bootstrapping one:
  sept import-encoder --weights dino_vits16.safetensors --arch timm/vit_small_patch16_224 --out enc.pt
or all of it on a generated demo corpus:  sept demo
A pool is a brace pattern, a directory of .tar shards or a text file listing shards.
A target task is an ImageFolder directory: train/CLASS/*.jpg and val/CLASS/*.jpg.
"""


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-address",
        default=None,
        help="address of a running Ray cluster (host:port); default: $RAY_ADDRESS if set, else start Ray locally",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sept",
        description="Select a task-specific pre-training subset from a huge WebDataset image pool, "
        "then pre-train on it (SEPT).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on a generated demo corpus",
        description="Make the demo corpus (real handwritten digits mixed with drawn shapes, "
        "textures and gradients), run every stage on it, and print target accuracy after "
        "pre-training on the selected subset versus a random subset of the same size.",
    )
    p.add_argument("--workdir", default="work/demo", help="where every stage writes (default: %(default)s)")
    p.add_argument(
        "--executor", choices=["local", "slurm"], default="local", help="where pre-training runs (default: %(default)s)"
    )
    p.add_argument(
        "--corpus-only",
        action="store_true",
        help="only make the demo corpus (WORKDIR/corpus: pool/, target/, truth.json), to run the stages on it yourself",
    )
    _add_ray(p)

    p = sub.add_parser(
        "experiment",
        help="pre-train on selected vs random vs full pool, over seeds and budgets",
        description="Run the pipeline once, then pre-train three arms with the same method, "
        "schedule and steps: the selected subset, a random subset of the same size, and the whole "
        "pool; score each (and an untrained floor) by linear probe and kNN on the target. Writes "
        "results.json, results.md and results.png; a rerun resumes.",
    )
    p.add_argument("--pool", required=True, help="pool shards: brace pattern, directory or listing file")
    p.add_argument("--target", required=True, help="target task: ImageFolder dir with train/ and val/")
    p.add_argument("--out", required=True, help="experiment directory")
    p.add_argument(
        "--budget-fraction",
        type=float,
        nargs="+",
        default=[0.1],
        help="share(s) of the pool to select, e.g. 0.05 0.1 0.2 (default: 0.1)",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--arms", nargs="+", default=["selected", "random", "full"], choices=["selected", "random", "full"])
    p.add_argument("--encoder", default=None, help="retrieval encoder to use instead of bootstrapping one")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--bootstrap-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--method",
        choices=["simclr", "moco", "byol", "detcon", "detcon_s", "detcon_b"],
        default="simclr",
        help="the self-supervised method every arm pre-trains with (default: %(default)s)",
    )
    p.add_argument(
        "--preset",
        choices=["fast"],
        default=None,
        help="fast: the acceleration strategies of arXiv 2212.05611 for every arm",
    )
    p.add_argument(
        "--pretrain-config",
        default=None,
        metavar="YAML",
        help="pre-training settings for every arm, as for `sept pretrain --config` (e.g. image_size, "
        "crop_min_scale, optimizer, lr); steps, batch size, method and seed come from the flags above",
    )
    p.add_argument(
        "--executor",
        choices=["inprocess", "local", "slurm"],
        default="inprocess",
        help="inprocess: arms one after another in this process, kNN tracked over steps (default); "
        "local: each arm through submitit, one after another; slurm: every arm and seed as one job array",
    )
    p.add_argument("--truth", default=None, help="JSON {pool key: label} to report selection precision")
    p.add_argument("--truth-label", default=None, help="the label in --truth that the target belongs to")
    _add_ray(p)

    p = sub.add_parser(
        "bootstrap",
        help="self-supervised training of the retrieval encoder on a random pool subset",
        description="SEPT step 1: train the retrieval encoder with self-supervision on a random "
        "subset of the pool. Users with a strong checkpoint of their own can skip this and pass "
        "it to --encoder of later stages.",
    )
    p.add_argument("--pool", required=True, help="pool shards: brace pattern, directory or listing file")
    p.add_argument("--out", required=True, help="encoder checkpoint to write (ENCODER.pt)")
    p.add_argument("--sample-size", type=int, default=None, help="pool images in the random subset")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--config", default=None, help="YAML with PretrainConfig fields to override")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--target",
        default=None,
        help="a labelled target task: score retrieval on it while "
        "training and keep the best weights (the untrained ones included), not the last",
    )

    p = sub.add_parser(
        "import-encoder",
        help="wrap your own checkpoint (timm or torchvision ResNet) as a sept encoder",
        description="A strong pre-trained checkpoint is the recommended retrieval encoder at scale. "
        "This reads a local state dict (.pth/.pt or .safetensors; nothing is downloaded), strips "
        "wrapper prefixes, drops the classifier head, checks every backbone weight is present, and "
        "writes ENCODER.pt with the model's preprocessing, for --encoder of embed and select.",
    )
    p.add_argument("--weights", required=True, help="the state dict file")
    p.add_argument(
        "--arch",
        required=True,
        help="timm/NAME for any timm model (needs timm: pip install "
        "'sept[timm]'), or resnet18|resnet34|resnet50 for torchvision",
    )
    p.add_argument("--out", required=True, help="sept encoder file to write")
    p.add_argument(
        "--image-size", type=int, default=None, help="input size (default: what timm records for the model, else 224)"
    )
    p.add_argument("--mean", type=float, nargs=3, default=None, help="RGB mean (default: the model's, else ImageNet)")
    p.add_argument("--std", type=float, nargs=3, default=None, help="RGB std (default: the model's, else ImageNet)")
    p.add_argument(
        "--strip-prefix",
        action="append",
        default=None,
        help="key prefix to remove, repeatable (default: module. model. backbone. encoder.)",
    )

    p = sub.add_parser(
        "embed",
        help="embed every pool shard into a Zarr store with Ray actors",
        description="Ray actors, each holding the encoder once, embed the pool shards into a "
        "Zarr store. Rerunning skips complete shards; a grown pool embeds only new shards.",
    )
    p.add_argument("--pool", required=True, help="pool shards: brace pattern, directory or listing file")
    p.add_argument("--encoder", required=True, help="sept encoder checkpoint or torchvision state dict")
    p.add_argument("--out", required=True, help="embeddings store to write (EMB.zarr)")
    p.add_argument("--workers", type=int, default=2, help="embedding actors (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=None,
        help="GPUs each actor reserves (default: 1 if the Ray cluster has GPUs, else 0); "
        "a GPU requested but not usable is an error, never a silent CPU run",
    )
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch threads (and CPUs) per actor")
    p.add_argument(
        "--decode-threads",
        type=int,
        default=2,
        help="image decoding threads per actor, running beside the model (default: %(default)s)",
    )
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="end non-zero when more than this fraction of samples is bad (default: %(default)s); "
        "bad samples are listed in EMB.zarr/quarantine.jsonl",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="refuse images above this many pixels, before decoding them (decompression bombs)",
    )
    _add_ray(p)

    p = sub.add_parser(
        "index",
        help="train a FAISS index once and encode its shards in parallel; `index eval` measures its recall",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="sept index --embeddings EMB --out INDEX [--add]: train the FAISS index on a "
        "sample of the embeddings, encode the index shards as parallel Ray tasks, and store "
        "everything in one Zarr store. --add encodes only pool shards embedded since.\n"
        "sept index eval --index INDEX --embeddings EMB: recall@1, recall@10 and QPS against exact "
        "search on held-out queries for a sweep of nprobe; prints the table, writes it as JSON and "
        "stores the chosen nprobe with the index.",
    )
    p.add_argument("action", nargs="?", choices=["build", "eval"], default="build", help="build (default) or eval")
    p.add_argument("--embeddings", required=True, help="embeddings store from `sept embed`")
    p.add_argument(
        "--out",
        default=None,
        help="build: index store to write (INDEX.zarr); eval: the JSON table to write (default: INDEX/eval.json)",
    )
    p.add_argument("--index", default=None, help="eval: the index store to evaluate")
    p.add_argument(
        "--factory",
        default="",
        help="FAISS factory string, e.g. Flat or IVF1024,PQ32 "
        "(default: chosen from the pool size, the dimension and --memory-budget)",
    )
    p.add_argument(
        "--memory-budget",
        default=None,
        help="memory the finished index may take, e.g. 16G or 512M; guides the choice of factory",
    )
    p.add_argument("--shards", type=int, default=2, help="index shards (default: %(default)s)")
    p.add_argument("--metric", choices=["ip", "l2"], default="ip")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists probed per query (until `index eval` chooses)")
    p.add_argument("--train-size", type=int, default=100_000, help="vectors sampled to train the index")
    p.add_argument("--add", action="store_true", help="encode only pool shards embedded since the index was built")
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="index the complete shards of an embeddings store that has incomplete ones",
    )
    p.add_argument("--queries", type=int, default=1000, help="eval: held-out queries (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="eval: recall@k (default: %(default)s)")
    p.add_argument(
        "--nprobe-sweep",
        default="",
        help="eval: comma-separated nprobe values (default: powers of two up to min(nlist, 256))",
    )
    p.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="eval: the chosen nprobe is the smallest reaching this recall@k (default: %(default)s)",
    )
    _add_ray(p)

    p = sub.add_parser(
        "select",
        help="retrieve the pool samples nearest to target tasks and write them",
        description="Embed the target tasks' train images, search every index shard once for all "
        "tasks, merge the per-shard top-k exactly, fill each task's budget (per target image, round "
        "robin, deduplicated, leakage-guarded) and write the union of the selections once, as shared "
        "WebDataset shards, with one manifest per task. A rerun resumes; adding a task later copies "
        "only its new samples.",
    )
    p.add_argument("--index", required=True, help="index store from `sept index`")
    p.add_argument("--encoder", required=True, help="the encoder the index was built with")
    p.add_argument(
        "--target",
        action="append",
        default=[],
        help="target task: ImageFolder dir with train/ (and val/, test/); repeat for several tasks",
    )
    p.add_argument(
        "--task",
        action="append",
        default=[],
        help="task name, one per --target in order (default: the target directory's name)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        metavar="TASKS.yaml",
        help="YAML list of tasks (name, target, budget), instead of or besides --target",
    )
    p.add_argument("--budget", type=int, default=None, help="pool samples to select per task")
    p.add_argument("--out", required=True, help="selection directory to write (shared by its tasks)")
    p.add_argument(
        "--strategy",
        choices=["instance", "topk", "cluster"],
        default="instance",
        help="instance: SEPT's per-instance search, each target image's nearest neighbours in "
        "turn (default); topk: the top scores only; cluster: k-means on the pool, keep the "
        "clusters the target falls into",
    )
    p.add_argument(
        "--balance",
        choices=["instance", "class"],
        default="class",
        help="split the budget evenly over classes (default), each class's share over its "
        "images, or over target images regardless of class",
    )
    p.add_argument(
        "--topk-share",
        type=float,
        default=0.5,
        help="with --strategy instance, the fraction of the budget filled by the top scores "
        "(per class with --balance class), the rest by the round robin over target images "
        "(default: %(default)s; 0 is SEPT's pure per-instance search). The defaults were chosen "
        "by benchmarks/retrieval_quality.py",
    )
    p.add_argument("--min-similarity", type=float, default=None, help="never select below this cosine similarity")
    p.add_argument(
        "--near-dup-threshold",
        type=float,
        default=None,
        help="keep one of pool images at least this similar to each other (default: off)",
    )
    p.add_argument(
        "--leakage-threshold",
        type=float,
        default=0.97,
        help="exclude pool images this similar to a target val/test image (default: %(default)s)",
    )
    p.add_argument(
        "--no-leakage-guard",
        dest="leakage_guard",
        action="store_false",
        help="do not exclude pool images close to the target's val/test images",
    )
    p.add_argument(
        "--clusters",
        type=int,
        default=None,
        help="k-means clusters for --strategy cluster (default: sqrt of the pool size)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the k-means (the other strategies are exact)")
    p.add_argument(
        "--searchers",
        type=int,
        default=None,
        help="searcher actors (default: one per index shard, at most the cluster's CPUs)",
    )
    p.add_argument(
        "--memory-per-searcher",
        default=None,
        metavar="SIZE",
        help="memory a searcher may hold, e.g. 8GB; shards that do not fit are searched in waves",
    )
    p.add_argument("--query-batch", type=int, default=1024, help="queries per batch sent to the searchers")
    _add_ray(p)

    p = sub.add_parser(
        "report",
        help="an HTML page and contact sheets to look at a selection",
        description="Write an HTML page with PNG contact sheets (target images with their top "
        "retrieved pool images and scores), the score histogram, per-class budget use, the "
        "duplicate and leakage counts and, given the truth, precision per class.",
    )
    p.add_argument("--selection", required=True, help="selection directory from `sept select`")
    p.add_argument("--out", required=True, help="report directory to write (index.html and PNGs)")
    p.add_argument("--task", action="append", default=[], help="task to show (repeatable; default: all)")
    p.add_argument("--truth", default=None, help="JSON {pool key: domain}, to measure precision")
    p.add_argument(
        "--domain",
        action="append",
        default=[],
        help="the domain of --truth that counts as relevant: DOMAIN for every task, or TASK=DOMAIN (repeatable)",
    )
    p.add_argument("--samples", type=int, default=8, help="target images per contact sheet")
    p.add_argument("--top", type=int, default=8, help="retrieved images shown per target image")
    p.add_argument("--seed", type=int, default=0, help="which target images are sampled")

    p = sub.add_parser(
        "pretrain",
        help="self-supervised DDP pre-training launched with submitit",
        description="Launch self-supervised pre-training with submitit: on this machine "
        "(--executor local) or on SLURM (--executor slurm). DDP uses gloo on CPU, NCCL on GPU.",
    )
    p.add_argument(
        "--data",
        required=True,
        help="training shards: brace pattern, directory or listing file; "
        "or a task of a selection (SEL/tasks/TASK), or a selection folder with --task: only the task's "
        "samples of the shared shards are read",
    )
    p.add_argument(
        "--task",
        default=None,
        help="with --data SEL (a selection folder): the task to train on (default: the selection's only task)",
    )
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, encoder.pt)")
    p.add_argument(
        "--method",
        choices=["simclr", "moco", "byol", "detcon", "detcon_s", "detcon_b"],
        default=None,
        help="SSL method; detcon = detcon_s (masks are computed into the run directory if the data has none)",
    )
    p.add_argument(
        "--preset",
        choices=["fast"],
        default=None,
        help="fast: every acceleration strategy of arXiv 2212.05611 (cyclic lr, progressive "
        "resolution and augmentation, hard positives); --config and flags still override it",
    )
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
    p.add_argument("--batch-size", type=int, default=None, help="per rank")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading processes per rank")
    p.add_argument("--config", default=None, help="YAML with PretrainConfig fields")
    p.add_argument("--target", default=None, help="evaluate on this target task when training ends")
    p.add_argument("--finetune", action="store_true", help="with --target: also fully fine-tune the encoder on it")

    p = sub.add_parser(
        "plan",
        help="estimate wall time, memory and storage of every stage for a pool",
        description="Estimate, for each stage, the wall time and throughput, the index's memory "
        "and disk size with the factory sept would choose, the number of index shards and "
        "searchers, and the storage of embeddings and selected shards. Throughputs come from "
        "a profile file: measure this machine's with --calibrate, or bring your cluster's.",
        epilog="example: sept plan --images 1000000000 --dim 256 --gpus 64 --nodes 8 "
        "--memory-per-node 512 --profile benchmarks/profiles/example-a100-node.json",
    )
    p.add_argument("--images", type=int, help="pool size")
    p.add_argument("--dim", type=int, default=256, help="embedding dimension (default: %(default)s)")
    p.add_argument("--gpus", type=int, help="GPUs in all (CPU nodes for a CPU profile)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--memory-per-node", type=float, default=256.0, help="GiB of RAM per node (default: %(default)s)")
    p.add_argument("--budget-fraction", type=float, default=0.1, help="share of the pool selected")
    p.add_argument("--queries", type=int, default=10_000, help="target images that query the index")
    p.add_argument("--epochs", type=float, default=100.0, help="pre-training epochs over the selection")
    p.add_argument("--profile", default="benchmarks/profiles/this-machine.json", help="profile JSON to read or write")
    p.add_argument("--calibrate", action="store_true", help="measure this machine and write --profile, then plan")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser(
        "evaluate",
        help="linear-probe and kNN accuracy of an encoder on a target task",
        description="Fit a linear probe and a kNN classifier (k=20, cosine) on frozen features "
        "of the target's train split and report accuracy on its val split.",
    )
    p.add_argument("--encoder", required=True, help="sept encoder checkpoint or torchvision state dict")
    p.add_argument("--target", required=True, help="target task: ImageFolder dir with train/ and val/")
    p.add_argument("--finetune", action="store_true", help="also fully fine-tune the encoder on the target")
    return parser


def run(args: argparse.Namespace) -> object:
    cmd = args.command
    if cmd == "demo":
        from sept.demo import make_corpus, run_demo

        if args.corpus_only:
            corpus = make_corpus(args.workdir)
            print(f"demo corpus: pool {corpus.pool_spec}, target {corpus.target_dir}, truth {corpus.truth_path}")
            return None
        return run_demo(args.workdir, executor=args.executor, ray_address=args.ray_address)
    if cmd == "experiment":
        from sept.experiment import ExperimentConfig, format_results, run_experiment

        results = run_experiment(
            ExperimentConfig(
                pool=args.pool,
                target=args.target,
                out=args.out,
                budget_fractions=args.budget_fraction,
                seeds=args.seeds,
                arms=args.arms,
                encoder=args.encoder,
                pretrain_steps=args.pretrain_steps,
                bootstrap_steps=args.bootstrap_steps,
                batch_size=args.batch_size,
                method=args.method,
                preset=args.preset,
                pretrain_config=args.pretrain_config,
                executor=args.executor,
                ray_address=args.ray_address,
                truth=args.truth,
                truth_label=args.truth_label,
            )
        )
        print(format_results(results))
        return None
    if cmd == "bootstrap":
        from sept.training.bootstrap import bootstrap

        kwargs = {k: v for k, v in dict(sample_size=args.sample_size, steps=args.steps).items() if v is not None}
        return bootstrap(args.pool, args.out, config=args.config, seed=args.seed, target=args.target, **kwargs)
    if cmd == "import-encoder":
        from sept.training.encoder.importer import DEFAULT_PREFIXES, import_encoder

        out = import_encoder(
            args.weights,
            args.arch,
            args.out,
            image_size=args.image_size,
            mean=args.mean,
            std=args.std,
            prefixes=tuple(args.strip_prefix or DEFAULT_PREFIXES),
        )
        print(f"sept import-encoder: wrote {out}", file=sys.stderr)
        return None
    if cmd == "embed":
        from sept.cluster.embed import EmbedConfig, embed_pool

        extra = {} if args.max_pixels is None else dict(max_pixels=args.max_pixels)
        return embed_pool(
            EmbedConfig(
                pool=args.pool,
                encoder=args.encoder,
                out=args.out,
                ray_address=args.ray_address,
                workers=args.workers,
                batch_size=args.batch_size,
                num_gpus_per_worker=args.num_gpus_per_worker,
                threads_per_worker=args.threads_per_worker,
                decode_threads=args.decode_threads,
                max_bad_fraction=args.max_bad_fraction,
                **extra,
            )
        )
    if cmd == "index":
        from sept.cluster.index_build import IndexConfig, build_index
        from sept.index.spec import IndexSpec, parse_bytes

        if args.action == "eval":
            from sept.index.eval import EvalConfig, evaluate_index, format_eval_table

            if not args.index:
                raise SeptError("index eval needs --index INDEX")
            try:
                sweep = [int(v) for v in args.nprobe_sweep.split(",") if v.strip()]
            except ValueError:
                raise SeptError(f"--nprobe-sweep takes comma-separated integers, got {args.nprobe_sweep!r}") from None
            result = evaluate_index(
                EvalConfig(
                    index=args.index,
                    embeddings=args.embeddings,
                    queries=args.queries,
                    k=args.k,
                    nprobes=sweep,
                    target_recall=args.target_recall,
                    out=args.out or "",
                )
            )
            print(format_eval_table(result))
            return None
        if not args.out:
            raise SeptError("index needs --out INDEX (or `sept index eval --index INDEX`)")
        spec = IndexSpec(
            factory=args.factory, metric=args.metric, shards=args.shards, nprobe=args.nprobe, train_size=args.train_size
        )
        summary = build_index(
            IndexConfig(
                embeddings=args.embeddings,
                out=args.out,
                spec=spec,
                ray_address=args.ray_address,
                memory_budget=parse_bytes(args.memory_budget),
                add=args.add,
                allow_partial=args.allow_partial,
            )
        )
        print(f"sept index: {summary['factory']}: {summary['reason']}", file=sys.stderr)
        return summary
    if cmd == "select":
        from sept.cluster.select import SelectConfig, select

        return select(
            SelectConfig(
                index=args.index,
                encoder=args.encoder,
                target=args.target,
                budget=args.budget,
                out=args.out,
                task=args.task,
                tasks_file=args.tasks,
                strategy=args.strategy,
                balance=args.balance,
                topk_share=args.topk_share,
                min_similarity=args.min_similarity,
                near_dup_threshold=args.near_dup_threshold,
                leakage_guard=args.leakage_guard,
                leakage_threshold=args.leakage_threshold,
                clusters=args.clusters,
                seed=args.seed,
                ray_address=args.ray_address,
                searchers=args.searchers,
                memory_per_searcher=args.memory_per_searcher,
                query_batch=args.query_batch,
            )
        )
    if cmd == "report":
        from sept.data.report import ReportConfig, write_report

        return write_report(
            ReportConfig(
                selection=args.selection,
                out=args.out,
                tasks=args.task,
                truth=args.truth,
                domain=args.domain,
                samples=args.samples,
                top=args.top,
                seed=args.seed,
            )
        )
    if cmd == "pretrain":
        from sept.data.task_subset import resolve_training_data
        from sept.training.config import load_config
        from sept.training.launcher import launch_pretrain

        data = resolve_training_data(args.data, args.task)
        overrides = {
            k: v
            for k, v in dict(
                data=data,
                out=args.out,
                method=args.method,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                num_workers=args.num_workers,
            ).items()
            if v is not None
        }
        cfg = load_config(args.config, overrides, preset=args.preset)
        summary = launch_pretrain(
            cfg,
            executor=args.executor,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            tasks_per_node=args.tasks_per_node,
            partition=args.partition,
            time_min=args.time,
            account=args.account,
            qos=args.qos,
            constraint=args.constraint,
        )
        if args.target:
            from sept.training.evaluate import evaluate

            summary = dict(summary, evaluation=evaluate(f"{args.out}/encoder.pt", args.target, finetune=args.finetune))
        return summary
    if cmd == "plan":
        from sept.cluster.plan import PlanInputs, Profile, calibrate, estimate, format_plan

        prof = calibrate(args.profile) if args.calibrate else Profile.load(args.profile)
        if args.images is None or args.gpus is None:
            if args.calibrate:
                return None
            raise SeptError("sept plan needs --images and --gpus (or --calibrate alone)")
        plan = estimate(
            PlanInputs(
                images=args.images,
                dim=args.dim,
                devices=args.gpus,
                nodes=args.nodes,
                memory_per_node_gib=args.memory_per_node,
                budget_fraction=args.budget_fraction,
                queries=args.queries,
                pretrain_epochs=args.epochs,
            ),
            prof,
        )
        if args.json:
            return plan
        print(format_plan(plan))
        return None
    if cmd == "evaluate":
        from sept.training.evaluate import evaluate

        return evaluate(args.encoder, args.target, finetune=args.finetune)
    raise AssertionError(cmd)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:  # which SIMD build faiss found is noise to a user, every command
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        result = run(args)
    except SeptError as exc:
        # A SeptError raised inside a Ray task arrives wrapped, with a traceback: print its cause.
        message = first_line(task_cause(exc))
        print(f"sept {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sept {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if result is not None and args.command != "demo":
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
