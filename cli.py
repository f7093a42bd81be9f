"""The `sept` command line: one subcommand per pipeline stage, each a thin layer over a Python function.

A stage's options are generated from its config dataclass (``sept.config_cli``): the defaults
and help texts live on the config's fields. A subcommand's options are added only when that
subcommand is parsed (``LazyParser``), so `sept --help` and each command import no more than
the command itself needs. Bad input raises SeptError, printed here as one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from sept.config_cli import LazyParser, add_config_arguments, command_description, config_from_args, config_overrides
from sept.errors import SeptError, first_line, task_cause
from sept.training.job_shape import EXECUTORS, JobShape

EPILOG = """\
The pipeline, stage by stage:
  sept bootstrap --pool 'pool/{00000..00099}.tar' --out enc.pt
  sept embed     --pool 'pool/{00000..00099}.tar' --encoder enc.pt --out emb.zarr
  sept index     --embeddings emb.zarr --out index.zarr --shards 4
  sept dedup     --embeddings emb.zarr
  sept select    --index index.zarr --encoder enc.pt --target mytask/ --budget 100000 --out sel/
  sept curate    --embeddings emb.zarr --size 100000 --out cur/   (a generic subset, balanced over clusters)
  sept report    --selection sel/ --out sel/report
  sept pretrain  --data sel/tasks/mytask --out run/ --executor slurm --nodes 2 --gpus-per-node 8
  sept evaluate  --encoder run/encoder.pt --target mytask/
Bring your own retrieval encoder instead of bootstrapping one:
  sept import-encoder --weights dino_vits16.safetensors --arch timm/vit_small_patch16_224 --out enc.pt
  sept encoder-check  --encoder enc.pt --target mytask/   (does it beat a thumbnail on your target?)
or all of it on a generated demo corpus:  sept demo
A pool is a brace pattern, a directory of .tar shards or a text file listing shards.
A target task is an ImageFolder directory: train/CLASS/*.jpg and val/CLASS/*.jpg.
"""


RAY = {
    "ray_address": {
        "help": "address of a running Ray cluster (host:port); default: $RAY_ADDRESS if set, else start Ray locally"
    }
}


def _add_job(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p.add_argument_group("job shape (submitit: local or SLURM)"), JobShape)


def _add_demo(p: argparse.ArgumentParser) -> None:
    """Make the demo corpus (real handwritten digits mixed with drawn shapes, textures and gradients), run every
    stage on it, and print target accuracy after pre-training on the selected subset versus a random subset of
    the same size.
    """
    p.add_argument("--workdir", default="work/demo", help="where every stage writes (default: %(default)s)")
    p.add_argument(
        "--executor", choices=EXECUTORS, default="local", help="where pre-training runs (default: %(default)s)"
    )
    p.add_argument(
        "--corpus-only",
        action="store_true",
        help="only make the demo corpus (WORKDIR/corpus: pool/, target/, truth.json), to run the stages on it yourself",
    )
    p.add_argument("--ray-address", default=None, help=RAY["ray_address"]["help"])
    _add_job(p)


def _run_demo(args: argparse.Namespace) -> object:
    from sept.demo import make_corpus, run_demo

    if args.corpus_only:
        corpus = make_corpus(args.workdir)
        print(f"demo corpus: pool {corpus.pool_spec}, target {corpus.target_dir}, truth {corpus.truth_path}")
        return None
    return run_demo(
        args.workdir, executor=args.executor, ray_address=args.ray_address, job=config_from_args(JobShape, args)
    )


def _add_experiment(p: argparse.ArgumentParser) -> None:
    """Run the pipeline once, then pre-train three arms with the same method, schedule and steps: the selected
    subset, a random subset of the same size, and the whole pool; score each (and an untrained floor) by linear
    probe and kNN on the target. Writes results.json, results.md and results.png; a rerun resumes.
    """
    from sept.experiment import ExperimentConfig

    add_config_arguments(p, ExperimentConfig, flags=RAY)
    _add_job(p)


def _run_experiment(args: argparse.Namespace) -> object:
    from sept.experiment import ExperimentConfig, format_results, run_experiment

    print(
        format_results(run_experiment(config_from_args(ExperimentConfig, args), job=config_from_args(JobShape, args)))
    )
    return None


def _add_bootstrap(p: argparse.ArgumentParser) -> None:
    """SEPT step 1: train the retrieval encoder with self-supervision on a random subset of the pool. Users with a
    strong checkpoint of their own can skip this and pass it to --encoder of later stages.
    """
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


def _run_bootstrap(args: argparse.Namespace) -> object:
    from sept.training.bootstrap import bootstrap

    kwargs = {k: v for k, v in dict(sample_size=args.sample_size, steps=args.steps).items() if v is not None}
    return bootstrap(args.pool, args.out, config=args.config, seed=args.seed, target=args.target, **kwargs)


def _add_import_encoder(p: argparse.ArgumentParser) -> None:
    """A strong pre-trained checkpoint is the recommended retrieval encoder at scale. This reads a local checkpoint
    (nothing is downloaded; torch files with weights_only=True): a timm or torchvision state dict, a DINOv2 release,
    an open_clip checkpoint or a Hugging Face model folder. It strips wrapper prefixes, drops the classifier head
    (or CLIP's text tower), checks every backbone weight is present, prints the preprocessing read from the
    checkpoint's own config, and writes ENCODER.pt for --encoder of embed and select.
    """
    from sept.training.encoder.importer import FORMATS
    from sept.training.encoder.pooling import POOLS
    from sept.training.encoder.preprocess import INTERPOLATIONS

    p.add_argument("--weights", required=True, help="the weights file (.pth/.pt/.bin/.safetensors) or model folder")
    p.add_argument(
        "--arch",
        default=None,
        help="timm/NAME for any timm model (needs timm: pip install 'sept[timm]'), resnet18|resnet34|resnet50 for "
        "torchvision, open_clip/NAME for a built-in open_clip model's checkpoint file; a model folder and "
        "--format dinov2 name their own",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="what --weights is (default: told apart by a folder's config file, the arch and a DINOv2 "
        "release's keys); a folder holding both open_clip's and Hugging Face's files reads as open_clip unless hf",
    )
    p.add_argument("--out", required=True, help="sept encoder file to write")
    p.add_argument(
        "--pool",
        choices=POOLS,
        default="default",
        help="which features: the model's own head-less output (default), its class token, or the mean of its "
        "patch tokens; recorded in the encoder's identity",
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="crop size (default: the checkpoint's config, else 224)"
    )
    p.add_argument(
        "--resize-size",
        type=int,
        default=None,
        help="shorter side before the centre crop (default: the config's, from crop_pct)",
    )
    p.add_argument(
        "--interpolation", choices=INTERPOLATIONS, default=None, help="resize interpolation (default: the config's)"
    )
    p.add_argument("--mean", type=float, nargs=3, default=None, help="RGB mean (default: the config's, else ImageNet)")
    p.add_argument("--std", type=float, nargs=3, default=None, help="RGB std (default: the config's, else ImageNet)")
    p.add_argument(
        "--arch-kwargs",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="timm create_model keyword arguments, e.g. '{\"img_size\": 224}'; recorded with the arch",
    )
    p.add_argument(
        "--strip-prefix",
        action="append",
        default=None,
        help="key prefix to remove, repeatable (default: module. model. backbone. encoder.)",
    )
    p.add_argument(
        "--key-map",
        metavar="FILE",
        default=None,
        help="YAML list of ordered regex renames {from: PATTERN, to: REPLACEMENT} for a checkpoint with its own "
        "key names; applied after --strip-prefix",
    )
    p.add_argument(
        "--center-pool",
        metavar="POOL",
        default=None,
        help="centre the features on the mean feature of a random sample of this pool, as sept bootstrap does: "
        "a checkpoint's features on a foreign pool share one direction (on the icon benchmark, +8 precision "
        "points with an ImageNet encoder; benchmarks/RESULTS.md)",
    )
    p.add_argument(
        "--center-samples", type=int, default=2048, help="pool images the centre is the mean of (default: %(default)s)"
    )


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text}")
    return value


def _run_import_encoder(args: argparse.Namespace) -> object:
    from sept.training.encoder.importer import DEFAULT_PREFIXES, import_encoder

    prefixes = tuple(args.strip_prefix or DEFAULT_PREFIXES)
    out = import_encoder(
        args.weights,
        args.arch,
        args.out,
        format=args.format,
        image_size=args.image_size,
        resize_size=args.resize_size,
        interpolation=args.interpolation,
        mean=args.mean,
        std=args.std,
        pool=args.pool,
        prefixes=prefixes,
        key_map=args.key_map,
        arch_kwargs=args.arch_kwargs,
        announce=lambda line: print(f"sept import-encoder: {line}", file=sys.stderr),
        center_pool=args.center_pool,
        center_samples=args.center_samples,
    )
    print(f"sept import-encoder: wrote {out}", file=sys.stderr)
    return None


def _add_encoder_check(p: argparse.ArgumentParser) -> None:
    """Before a pass over the pool: does this encoder tell the target's classes apart better than trivial features?
    Measured on the target alone (with --pool, and a small pool sample), in seconds to minutes. The encoder, a
    grayscale 16x16 thumbnail and a colour histogram each embed the target's images; for each, two kNN accuracies
    (cosine, k neighbours, majority vote): "train, leave-one-out" (each train image's nearest other train images
    vote for its class) and "val from train" (each val image's nearest train images vote). Selection retrieves pool
    images near the target's train images, so these say how often an encoder's neighbours of a target image share
    its class. Without --pool, the verdict reads the val number (a bootstrap encoder keeps the weights that
    retrieve train best, so train flatters it).

    Telling the target's classes apart is not finding the target's domain in the pool, which is what selection
    precision depends on. With --pool, a random sample of the pool (--pool-samples images) is embedded like the
    target, and each train image, as selection queries the pool with it, takes its k nearest among the val images
    and the pool sample: "target among pool" is the share of val images among them (without val, of the other
    train images). The val images stand for the pool's in-domain images; the verdict then reads this number. It
    counts the pool's own in-domain images near the target as misses, so where the target's images differ in style
    from the pool's (benchmarks/RESULTS.md, "Issue 18: the encoder check") it does not predict selection precision.

    When it warns (the encoder no better than the best trivial feature), a selection with this encoder is unlikely
    to beat one by that feature: try another checkpoint, give an imported one a centre (import-encoder
    --center-pool POOL), or bootstrap one on the pool (sept bootstrap --target T). A margin within the noise of a
    small target is said so; label more val images to tell.
    """
    from sept.training.encoder_check import EncoderCheckConfig

    add_config_arguments(p, EncoderCheckConfig)


def _run_encoder_check(args: argparse.Namespace) -> object:
    from sept.training.encoder_check import EncoderCheckConfig, check_encoder, format_check, verdict

    cfg = config_from_args(EncoderCheckConfig, args)
    result = check_encoder(
        cfg.encoder,
        cfg.target,
        k=cfg.k,
        batch_size=cfg.batch_size,
        device=cfg.device,
        pool=cfg.pool,
        pool_samples=cfg.pool_samples,
    )
    if not cfg.json:
        print(format_check(result))
    print(f"sept encoder-check: {verdict(result)}", file=sys.stderr)
    if cfg.strict and result["no_better"]:
        raise SeptError(f"{cfg.encoder} is no better than the {result['best_trivial']} on {cfg.target} (--strict)")
    return result if cfg.json else None


def _add_embed(p: argparse.ArgumentParser) -> None:
    """Ray actors, each holding the encoder once, embed the pool shards into a Zarr store. Rerunning skips complete
    shards; a grown pool embeds only new shards.
    """
    from sept.cluster.embed import EmbedConfig

    add_config_arguments(p, EmbedConfig, flags=RAY)


def _run_embed(args: argparse.Namespace) -> object:
    from sept.cluster.embed import EmbedConfig, embed_pool

    return embed_pool(config_from_args(EmbedConfig, args))


def _add_index(p: argparse.ArgumentParser) -> None:
    """sept index --embeddings EMB --out INDEX [--add]: train the FAISS index on a sample of the embeddings, encode
    the index shards as parallel Ray tasks, and store everything in one Zarr store. --add encodes only pool
    shards embedded since.

    sept index eval --index INDEX --embeddings EMB: recall@1, recall@10 and QPS against exact search on held-out
    queries for a sweep of nprobe, over a sample of --eval-shards index shards (drawn by the seed; the table
    names them); prints the table, writes it as JSON and stores the chosen nprobe with the index.
    """
    from sept.cluster.index_build import IndexConfig
    from sept.index.eval import EvalConfig
    from sept.index.spec import IndexSpec

    p.add_argument("action", nargs="?", choices=["build", "eval"], default="build", help="build (default) or eval")
    p.add_argument(
        "--out",
        default=None,
        help="build: index store to write (INDEX.zarr); eval: the JSON table to write (default: INDEX/eval.json)",
    )
    p.add_argument("--index", default=None, help="eval: the index store to evaluate")
    add_config_arguments(p, IndexConfig, flags=RAY)
    add_config_arguments(p, IndexSpec)
    add_config_arguments(p, EvalConfig)


def _run_index(args: argparse.Namespace) -> object:
    from sept.cluster.index_build import IndexConfig, build_index
    from sept.index.spec import IndexSpec, parse_bytes

    if args.action == "eval":
        from sept.index.eval import EvalConfig, evaluate_index, format_eval_table

        if not args.index:
            raise SeptError("index eval needs --index INDEX")
        print(format_eval_table(evaluate_index(config_from_args(EvalConfig, args, out=args.out or ""))))
        return None
    if not args.out:
        raise SeptError("index needs --out INDEX (or `sept index eval --index INDEX`)")
    spec = config_from_args(IndexSpec, args)
    summary = build_index(config_from_args(IndexConfig, args, spec=spec, memory_budget=parse_bytes(args.memory_budget)))
    print(f"sept index: {summary['factory']}: {summary['reason']}", file=sys.stderr)
    return summary


def _add_select(p: argparse.ArgumentParser) -> None:
    """Embed the target tasks' train images, search every index shard once for all tasks, merge the per-shard top-k
    exactly, fill each task's budget (per target image, round robin, deduplicated, leakage-guarded) and write
    the union of the selections once, as shared WebDataset shards, with one manifest per task. A rerun resumes;
    adding a task later copies only its new samples.
    """
    from sept.cluster.select_config import SelectConfig

    add_config_arguments(p, SelectConfig, flags=RAY)


def _run_select(args: argparse.Namespace) -> object:
    from sept.cluster.select import select
    from sept.cluster.select_config import SelectConfig

    return select(config_from_args(SelectConfig, args))


def _add_dedup(p: argparse.ArgumentParser) -> None:
    """Find exact copies (equal image bytes, by the content hash `sept embed` records) and near copies (cosine at
    least --threshold, compared within k-means clusters, never all pairs) across the whole pool, keep one sample of
    each group (exact: the first in pool order; near: the one nearest its cluster's centroid), and write the
    dedup table into the embeddings store. `sept select` and `sept curate` then skip the removed samples
    (--no-dedup keeps them). Map, exact and near rounds run as Ray tasks; a killed run redoes only unfinished tasks.
    """
    from sept.cluster.dedup import DedupConfig

    add_config_arguments(p, DedupConfig, flags=RAY)


def _run_dedup(args: argparse.Namespace) -> object:
    from sept.cluster.dedup import DedupConfig, dedup

    return dedup(config_from_args(DedupConfig, args))


def _add_curate(p: argparse.ArgumentParser) -> None:
    """Hierarchical k-means over the pool's embeddings (several levels, with the resampling that spreads the
    centroids over the data, faiss on a GPU when there is one), then draw --size samples balanced over the
    top-level clusters, and write them as the task `curated` of a selection folder: shared WebDataset shards and
    a manifest, for `sept pretrain --data OUT/tasks/curated`. A rerun resumes.
    """
    from sept.cluster.curate import CurateConfig

    add_config_arguments(p, CurateConfig, flags=RAY)


def _run_curate(args: argparse.Namespace) -> object:
    from sept.cluster.curate import CurateConfig, curate

    return curate(config_from_args(CurateConfig, args))


def _add_report(p: argparse.ArgumentParser) -> None:
    """Write an HTML page with PNG contact sheets (target images with their top retrieved pool images and scores),
    the score histogram, per-class budget use, the duplicate and leakage counts and, given the truth, precision
    per class.
    """
    from sept.data.report import ReportConfig

    add_config_arguments(p, ReportConfig)


def _run_report(args: argparse.Namespace) -> object:
    from sept.data.report import ReportConfig, write_report

    return write_report(config_from_args(ReportConfig, args))


def _add_pretrain(p: argparse.ArgumentParser) -> None:
    """Launch self-supervised pre-training with submitit: on this machine (--executor local) or on SLURM
    (--executor slurm). DDP uses gloo on CPU, NCCL on GPU.
    """
    from sept.training.config import PRESETS, PretrainConfig

    add_config_arguments(p, PretrainConfig, override=True)
    p.add_argument(
        "--task",
        default=None,
        help="with --data SEL (a selection folder): the task to train on (default: the selection's only task)",
    )
    p.add_argument("--config", default=None, help="YAML with PretrainConfig fields")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="fast: every acceleration strategy of arXiv 2212.05611 (cyclic lr, progressive "
        "resolution and augmentation, hard positives); --config and flags still override it",
    )
    p.add_argument("--target", default=None, help="evaluate on this target task when training ends")
    p.add_argument("--finetune", action="store_true", help="with --target: also fully fine-tune the encoder on it")
    p.add_argument("--executor", choices=EXECUTORS, default="local", help="where the job runs (default: %(default)s)")
    _add_job(p)


def _run_pretrain(args: argparse.Namespace) -> object:
    from sept.data.task_subset import resolve_training_data
    from sept.training.config import PretrainConfig, load_config
    from sept.training.launcher import launch_pretrain

    data = resolve_training_data(args.data, args.task)
    overrides = dict(config_overrides(PretrainConfig, args), data=data)
    cfg = load_config(args.config, overrides, preset=args.preset)
    summary = launch_pretrain(cfg, executor=args.executor, shape=config_from_args(JobShape, args))
    if args.target:
        from sept.training.evaluate import evaluate

        summary = dict(summary, evaluation=evaluate(f"{args.out}/encoder.pt", args.target, finetune=args.finetune))
    return summary


def _add_plan(p: argparse.ArgumentParser) -> None:
    """Estimate, for each stage, the wall time and throughput, the index's memory and disk size with the factory
    sept would choose, the number of index shards and searchers, and the storage of embeddings and selected
    shards. Throughputs come from a profile file: measure this machine's with --calibrate, or bring your
    cluster's.
    """
    from sept.cluster.plan import PlanInputs

    add_config_arguments(p, PlanInputs)
    p.add_argument("--profile", default="benchmarks/profiles/this-machine.json", help="profile JSON to read or write")
    p.add_argument("--calibrate", action="store_true", help="measure this machine and write --profile, then plan")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _run_plan(args: argparse.Namespace) -> object:
    from sept.cluster.plan import PlanInputs, Profile, calibrate, estimate, format_plan

    prof = calibrate(args.profile) if args.calibrate else Profile.load(args.profile)
    if args.images is None or args.devices is None:
        if args.calibrate:
            return None
        raise SeptError("sept plan needs --images and --gpus (or --calibrate alone)")
    plan = estimate(config_from_args(PlanInputs, args), prof)
    if args.json:
        return plan
    print(format_plan(plan))
    return None


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    """Fit a linear probe and a kNN classifier (k=20, cosine) on frozen features of the target's train split and
    report accuracy on its val split.
    """
    p.add_argument("--encoder", required=True, help="sept encoder checkpoint or torchvision state dict")
    p.add_argument("--target", required=True, help="target task: ImageFolder dir with train/ and val/")
    p.add_argument("--finetune", action="store_true", help="also fully fine-tune the encoder on the target")


def _run_evaluate(args: argparse.Namespace) -> object:
    from sept.training.evaluate import evaluate

    return evaluate(args.encoder, args.target, finetune=args.finetune)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "demo": ("run the whole pipeline on a generated demo corpus", _add_demo, _run_demo),
    "experiment": (
        "pre-train on selected vs random vs full pool, over seeds and budgets",
        _add_experiment,
        _run_experiment,
    ),
    "bootstrap": (
        "self-supervised training of the retrieval encoder on a random pool subset",
        _add_bootstrap,
        _run_bootstrap,
    ),
    "import-encoder": (
        "wrap your own checkpoint (timm, torchvision, DINOv2, open_clip, Hugging Face) as a sept encoder",
        _add_import_encoder,
        _run_import_encoder,
    ),
    "encoder-check": (
        "does an encoder separate the target's classes better than a thumbnail? (before a pool pass)",
        _add_encoder_check,
        _run_encoder_check,
    ),
    "embed": ("embed every pool shard into a Zarr store with Ray actors", _add_embed, _run_embed),
    "index": (
        "train a FAISS index once and encode its shards in parallel; `index eval` measures its recall",
        _add_index,
        _run_index,
    ),
    "dedup": (
        "remove exact and near-duplicate samples pool-wide: a dedup table in the embeddings",
        _add_dedup,
        _run_dedup,
    ),
    "select": ("retrieve the pool samples nearest to target tasks and write them", _add_select, _run_select),
    "curate": ("a generic subset of the pool, balanced over hierarchical k-means clusters", _add_curate, _run_curate),
    "report": ("an HTML page and contact sheets to look at a selection", _add_report, _run_report),
    "pretrain": ("self-supervised DDP pre-training launched with submitit", _add_pretrain, _run_pretrain),
    "plan": ("estimate wall time, memory and storage of every stage for a pool", _add_plan, _run_plan),
    "evaluate": ("linear-probe and kNN accuracy of an encoder on a target task", _add_evaluate, _run_evaluate),
}
EXTRA = {  # more of add_parser's arguments, by command
    "index": dict(formatter_class=argparse.RawDescriptionHelpFormatter),
    "plan": dict(
        epilog="example: sept plan --images 1000000000 --dim 256 --gpus 64 --nodes 8 --memory-per-node 512 --profile benchmarks/profiles/example-a100-node.json"
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sept",
        description="Select a task-specific pre-training subset from a huge WebDataset image pool, "
        "then pre-train on it (SEPT).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=LazyParser)
    for name, (summary, populate, _) in COMMANDS.items():
        sub.add_parser(
            name, help=summary, description=command_description(populate), populate=populate, **EXTRA.get(name, {})
        )
    return parser


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
        result = COMMANDS[args.command][2](args)
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
