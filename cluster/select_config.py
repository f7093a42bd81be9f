"""``SelectConfig``: every option of ``sept select``, its default and its help (the CLI's flags
are generated from these fields by ``sept.config_cli``), and the check of their ranges.

The fields from ``ray_address`` on only say how the work is spread, never what is selected;
what a task's selection records of the others is ``sept.cluster.select._task_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sept.cluster.search import DEFAULT_QUERY_BATCH
from sept.errors import SeptError
from sept.index.strategies import BALANCES, STRATEGIES


@dataclass
class SelectConfig:
    index: str = field(metadata={"help": "index store from `sept index`"})
    encoder: str = field(metadata={"help": "the encoder the index was built with"})
    target: str | list[str] = field(
        default_factory=list,
        metadata={"help": "target task: ImageFolder dir with train/ (and val/, test/); repeat for several tasks"},
    )
    budget: int | None = field(default=None, metadata={"help": "pool samples to select per task"})
    out: str = field(
        default="", metadata={"help": "selection directory to write (shared by its tasks)", "required": True}
    )
    task: str | list[str] = field(
        default_factory=list,
        metadata={"help": "task name, one per --target in order (default: the target directory's name)"},
    )
    tasks_file: str | None = field(
        default=None,
        metadata={
            "flag": "--tasks",
            "metavar": "TASKS.yaml",
            "help": "YAML list of tasks (name, target, budget), instead of or besides --target",
        },
    )
    strategy: str = field(
        default="instance",
        metadata={
            "choices": STRATEGIES,
            "help": "instance: SEPT's per-instance search, each target image's nearest neighbours in turn "
            "(default); topk: the top scores only; cluster: k-means on the pool, keep the clusters the "
            "target falls into",
        },
    )
    # The defaults below were chosen by benchmarks/retrieval_quality.py (see index/strategies.py).
    balance: str = field(
        default="class",
        metadata={
            "choices": BALANCES,
            "help": "split the budget evenly over classes (default), each class's share over its images, "
            "or over target images regardless of class",
        },
    )
    topk_share: float = field(  # of the instance strategy's budget
        default=0.5,
        metadata={
            "help": "with --strategy instance, the fraction of the budget filled by the top scores (per "
            "class with --balance class), the rest by the round robin over target images (default: "
            "%(default)s; 0 is SEPT's pure per-instance search). The defaults were chosen by "
            "benchmarks/retrieval_quality.py"
        },
    )
    min_similarity: float | None = field(default=None, metadata={"help": "never select below this cosine similarity"})
    near_dup_threshold: float | None = field(
        default=None,
        metadata={"help": "keep one of pool images at least this similar to each other (default: off)"},
    )
    dedup: bool = field(
        default=True,
        metadata={
            "help": "skip the samples the pool's dedup table (`sept dedup`) removes, whenever the embeddings "
            "hold one (default: on; --no-dedup keeps them)"
        },
    )
    leakage_guard: bool = field(
        default=True,
        metadata={
            "help": "exclude pool images close to the target's val/test images (default: on; "
            "--no-leakage-guard turns the guard off)"
        },
    )
    # cosine; distinct images of one class reach ~0.975 with the demo encoder, copies ~0.998
    leakage_threshold: float = field(
        default=0.97,
        metadata={"help": "exclude pool images this similar to a target val/test image (default: %(default)s)"},
    )
    clusters: int | None = field(
        default=None,
        metadata={"help": "k-means clusters for --strategy cluster (default: sqrt of the pool size)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the k-means (the other strategies are exact)"})
    # how, not what: these never change the selection
    ray_address: str | None = None
    searchers: int | None = field(
        default=None,
        metadata={"help": "searcher actors (default: one per index shard, at most the cluster's CPUs)"},
    )
    memory_per_searcher: str | int | None = field(
        default=None,
        metadata={
            "metavar": "SIZE",
            "help": "memory a searcher may hold, e.g. 8GB; shards that do not fit are searched in waves",
        },
    )
    query_batch: int = field(default=DEFAULT_QUERY_BATCH, metadata={"help": "queries per batch sent to the searchers"})
    copy_timeout_s: float = field(
        default=1800.0,
        metadata={"help": "seconds a copy job may take before it counts as stalled and is retried (3 tries)"},
    )


def as_list(value) -> list[str]:
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


def check_select_config(cfg: SelectConfig) -> None:
    """Raise ``SeptError`` naming the flag of an option out of its range."""
    if cfg.strategy not in STRATEGIES:
        raise SeptError(f"--strategy {cfg.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    if cfg.balance not in BALANCES:
        raise SeptError(f"--balance {cfg.balance!r} is unknown; use one of {', '.join(BALANCES)}")
    for name, value in (
        ("--min-similarity", cfg.min_similarity),
        ("--near-dup-threshold", cfg.near_dup_threshold),
        ("--leakage-threshold", cfg.leakage_threshold),
    ):
        if value is not None and not -1.0 <= value <= 1.0:
            raise SeptError(f"{name} {value} is not a cosine similarity in [-1, 1]")
    if not 0.0 <= cfg.topk_share <= 1.0:
        raise SeptError(f"--topk-share {cfg.topk_share} is not a fraction in [0, 1]")
    if cfg.clusters is not None and cfg.clusters < 1:
        raise SeptError(f"--clusters must be at least 1, got {cfg.clusters}")
    if not cfg.out:
        raise SeptError("no --out folder given")
