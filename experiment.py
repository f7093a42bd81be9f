"""sept experiment: does selection pay on this pool and target? Three arms, several seeds, one table.

The pipeline runs once (bootstrap, embed, index); then, for every budget fraction and seed, the
same method, schedule and number of steps pre-trains three arms:

- **selected**: the subset `sept select` chose;
- **random**: a uniformly random subset of the same size;
- **full**: the whole pool;

and an untrained encoder gives the floor. Each arm is scored by linear probe and kNN on the
target's val split, and kNN is also tracked over training steps. Every finished piece leaves a
file behind, so a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from sept.data.selection_folder import MANIFEST, SHARDS_DIR, task_dir
from sept.io import atomic_write_json, atomic_write_text
from sept.training.job_shape import JobShape

log = logging.getLogger(__name__)

ARMS = ("selected", "random", "full")


@dataclass
class ExperimentConfig:
    pool: str = field(metadata={"help": "pool shards: brace pattern, directory or listing file"})
    target: str = field(metadata={"help": "target task: ImageFolder dir with train/ and val/"})
    out: str = field(metadata={"help": "experiment directory"})
    budget_fractions: list[float] = field(
        default_factory=lambda: [0.1],
        metadata={
            "flag": "--budget-fraction",
            "nargs": "+",
            "help": "share(s) of the pool to select, e.g. 0.05 0.1 0.2",
        },
    )
    seeds: int = field(default=3, metadata={"help": "seeds per arm and budget"})
    arms: list[str] = field(
        default_factory=lambda: list(ARMS),
        metadata={"nargs": "+", "choices": ARMS, "help": "the arms to pre-train"},
    )
    encoder: str | None = field(  # None: bootstrap one
        default=None, metadata={"help": "retrieval encoder to use instead of bootstrapping one"}
    )
    bootstrap_samples: int = 2000
    bootstrap_steps: int = field(default=300, metadata={"help": "optimizer steps of the bootstrapped encoder"})
    pretrain_steps: int = field(default=300, metadata={"help": "optimizer steps of every arm"})
    batch_size: int = field(default=64, metadata={"help": "pre-training batch size of every arm"})
    method: str = field(
        default="simclr",
        metadata={
            # the names sept.training.config accepts (tests/test_config_cli.py checks they agree)
            "choices": ("simclr", "moco", "byol", "detcon", "detcon_s", "detcon_b"),
            "help": "the self-supervised method every arm pre-trains with (default: %(default)s)",
        },
    )
    preset: str | None = field(  # a named set of pre-training settings (sept.training.config.PRESETS)
        default=None,
        metadata={"choices": ("fast",), "help": "fast: the acceleration strategies of arXiv 2212.05611 for every arm"},
    )
    pretrain_config: str | None = field(  # the flags above win over it
        default=None,
        metadata={
            "metavar": "YAML",
            "help": "pre-training settings for every arm, as for `sept pretrain --config` (e.g. image_size, "
            "crop_min_scale, optimizer, lr); steps, batch size, method and seed come from the flags above",
        },
    )
    pretrain_settings: dict = field(default_factory=dict)  # PretrainConfig keys for every arm, above the YAML's
    curve_points: int = 4  # kNN measured at this many evenly spaced steps
    executor: str = field(
        default="inprocess",
        metadata={
            "choices": ("inprocess", "local", "slurm"),
            "help": "inprocess: arms one after another in this process, kNN tracked over steps (default); "
            "local: each arm through submitit, one after another; slurm: every arm and seed as one job array",
        },
    )
    index_shards: int = 2
    ray_address: str | None = None
    truth: str | None = field(default=None, metadata={"help": "JSON {pool key: label} to report selection precision"})
    truth_label: str | None = field(default=None, metadata={"help": "the label in --truth that the target belongs to"})


def _done(path: str) -> dict | None:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def _write_json(path: str, obj) -> None:
    atomic_write_json(path, obj, default=str)


def untrained_encoder(
    path: str, seed: int, *, arch: str = "resnet18_small", width: int | None = None, image_size: int = 32
) -> str:
    """The floor: the arms' network with its random initial weights, scored at the arms' resolution."""
    import torch

    from sept.training.encoder import IMAGENET_MEAN, IMAGENET_STD, build_backbone, save_encoder

    if not os.path.exists(path):
        torch.manual_seed(seed)
        backbone, _ = build_backbone(arch, width=width)
        save_encoder(path, backbone, arch=arch, image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return path


def random_subset(embeddings: str, budget: int, pool: list[str], out_dir: str, seed: int) -> str:
    """Materialize `budget` pool samples drawn uniformly; returns the shard directory."""
    from sept.cluster.materialize import materialize
    from sept.index.embedding_store import EmbeddingStore

    shards = os.path.join(out_dir, SHARDS_DIR)
    if _done(os.path.join(out_dir, "done.json")) is None:
        _, ids = EmbeddingStore.open(embeddings).read_all()
        chosen = np.sort(np.random.default_rng(seed).choice(ids, size=budget, replace=False))
        catalog = materialize(chosen, pool, shards)
        rows = (catalog.row(i) for i in chosen.tolist())
        atomic_write_text(os.path.join(out_dir, MANIFEST), "".join(json.dumps(r) + "\n" for r in rows))
        _write_json(os.path.join(out_dir, "done.json"), dict(budget=budget, seed=seed))
    return shards


def selection_precision(manifest_path: str, truth: dict[str, str], label: str) -> float:
    with open(manifest_path) as f:
        keys = [json.loads(line)["key"] for line in f]
    return float(np.mean([truth.get(k) == label for k in keys])) if keys else 0.0


def _arm_config(data: str, run_dir: str, cfg: ExperimentConfig, seed: int):
    from sept.training.config import load_config

    return load_config(
        cfg.pretrain_config,
        dict(
            cfg.pretrain_settings,
            data=data,
            out=run_dir,
            steps=cfg.pretrain_steps,
            batch_size=cfg.batch_size,
            seed=seed,
            method=cfg.method,
        ),
        preset=cfg.preset,
    )


def _curve_marks(cfg: ExperimentConfig) -> list[int]:
    return sorted({max(1, round(cfg.pretrain_steps * (i + 1) / cfg.curve_points)) for i in range(cfg.curve_points)})


SNAPSHOT_PREFIX = "encoder-step"


def snapshot_path(run_dir: str, step: int) -> str:
    """Where the kNN curve's encoder at ``step`` is kept (``score_arm`` reads the step back off it)."""
    return os.path.join(run_dir, f"{SNAPSHOT_PREFIX}{step:06d}.pt")


def snapshot_steps(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every curve snapshot in ``run_dir``, by step."""
    import glob

    found = glob.glob(os.path.join(run_dir, f"{SNAPSHOT_PREFIX}*.pt"))
    return sorted((int(os.path.basename(p)[len(SNAPSHOT_PREFIX) : -len(".pt")]), p) for p in found)


def train_arm_inprocess(pcfg, cfg: ExperimentConfig) -> dict:
    """Pre-train one arm in this process, saving the encoder at ``curve_points`` steps for the kNN curve."""
    from sept.training.encoder import IMAGENET_MEAN, IMAGENET_STD, save_encoder
    from sept.training.trainer import train

    marks = _curve_marks(cfg)

    def snapshot(step: int, backbone) -> None:
        if step in marks:
            save_encoder(
                snapshot_path(pcfg.out, step),
                backbone,
                arch=pcfg.arch,
                image_size=pcfg.image_size,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
            )

    t0 = time.time()
    summary = train(pcfg, distributed_run=False, step_callback=snapshot)
    return dict(summary, wall_s=time.time() - t0)


def score_arm(run_dir: str, target: str, summary: dict, images: int, default_steps: int) -> dict:
    """Linear probe and kNN of the arm's final encoder, the kNN of every step snapshot; written to arm.json."""
    from sept.errors import SeptError
    from sept.training.evaluate import evaluate

    if summary.get("interrupted"):  # a signal stopped the trainer at a checkpoint: nothing to score yet
        raise SeptError(
            f"pre-training of {run_dir} stopped at step {summary.get('steps')} on {summary['interrupted']}; "
            "rerun the same command to resume it"
        )
    curve = [dict(step=step, knn=evaluate(path, target)["knn"]) for step, path in snapshot_steps(run_dir)]
    final = evaluate(os.path.join(run_dir, "encoder.pt"), target)
    result = dict(
        linear_probe=final["linear_probe"],
        knn=final["knn"],
        curve=curve,
        wall_s=summary.get("wall_s"),
        images=images,
        steps=summary.get("steps", default_steps),
    )
    if "job_id" in summary:
        result["job_id"] = summary["job_id"]
    _write_json(os.path.join(run_dir, "arm.json"), result)
    return result


def pretrain_arms(
    arms: list[tuple[str, str, int, int]], target: str, cfg: ExperimentConfig, out: str, job: JobShape | None = None
) -> dict[str, dict]:
    """Pre-train and score every (data, run_dir, seed, images) arm not already done; returns results by run_dir.

    In process, the arms run one after another and kNN is tracked over steps. On SLURM, every
    pending arm goes out as one job array (one sbatch), so seeds and arms run side by side as the
    cluster allows; the local executor runs them one after another through submitit. ``job``
    shapes each submitit job (default ``JobShape()``); it is how, not what, so no part of the
    recorded config."""
    results, pending = {}, []
    for data, run_dir, seed, images in arms:
        if (done := _done(os.path.join(run_dir, "arm.json"))) is not None:
            results[run_dir] = done
        else:
            os.makedirs(run_dir, exist_ok=True)
            pending.append((_arm_config(data, run_dir, cfg, seed), images))
    if not pending:
        return results
    if cfg.executor == "inprocess":
        for pcfg, images in pending:
            results[pcfg.out] = score_arm(pcfg.out, target, train_arm_inprocess(pcfg, cfg), images, cfg.pretrain_steps)
        return results
    from sept.training.launcher import launch_pretrain, launch_pretrain_array

    t0 = time.time()
    if cfg.executor == "local":
        # On one machine, arms running side by side only fight over its cores: one after the
        # other is faster (benchmarks/RESULTS.md).
        summaries = [launch_pretrain(pcfg, executor="local", shape=job) for pcfg, _ in pending]
    else:
        summaries = launch_pretrain_array(
            [pcfg for pcfg, _ in pending],
            log_folder=os.path.join(out, "runs", "submitit"),
            executor=cfg.executor,
            shape=job,
        )
    wall = time.time() - t0
    for (pcfg, images), summary in zip(pending, summaries):
        results[pcfg.out] = score_arm(
            pcfg.out, target, dict(summary, wall_s=summary.get("elapsed_s", wall)), images, cfg.pretrain_steps
        )
    return results


def run_experiment(cfg: ExperimentConfig, *, job: JobShape | None = None) -> dict:
    from sept.cluster.embed import EmbedConfig, embed_pool
    from sept.cluster.index_build import IndexConfig, build_index
    from sept.cluster.runtime import ray_session
    from sept.cluster.select import select
    from sept.cluster.select_config import SelectConfig
    from sept.errors import SeptError
    from sept.index.spec import IndexSpec
    from sept.index.store import IndexStore
    from sept.training.bootstrap import bootstrap
    from sept.training.evaluate import evaluate

    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        raise SeptError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    out = os.path.abspath(cfg.out)
    os.makedirs(out, exist_ok=True)
    recorded = _done(os.path.join(out, "config.json"))
    if recorded is not None and recorded != asdict(cfg):
        raise SeptError(f"{cfg.out} holds an experiment with another config; choose another --out or delete it")
    _write_json(os.path.join(out, "config.json"), asdict(cfg))
    timings: dict[str, float] = {}
    encoder = cfg.encoder or os.path.join(out, "encoder.pt")
    t = time.time()
    if not os.path.exists(encoder):
        # With the target, the bootstrap keeps the weights that retrieve its classes best.
        bootstrap(
            cfg.pool,
            encoder,
            sample_size=cfg.bootstrap_samples,
            steps=cfg.bootstrap_steps,
            seed=0,
            batch_size=cfg.batch_size,
            target=cfg.target,
        )
    timings["bootstrap"] = time.time() - t
    emb, index = os.path.join(out, "embeddings.zarr"), os.path.join(out, "index.zarr")
    truth = None
    if cfg.truth:
        with open(cfg.truth) as f:
            truth = json.load(f)
    results: dict = dict(config=asdict(cfg), fractions={}, floor=[], timings=timings)
    with ray_session(cfg.ray_address):
        t = time.time()
        embed_pool(EmbedConfig(pool=cfg.pool, encoder=encoder, out=emb, ray_address=cfg.ray_address))
        timings["embed"] = time.time() - t
        t = time.time()
        build_index(IndexConfig(embeddings=emb, out=index, spec=IndexSpec(shards=cfg.index_shards)))
        timings["index"] = time.time() - t
        attrs = IndexStore.open(index).attrs
        ntotal, pool = int(attrs["ntotal"]), attrs["pool"]
        data: dict[tuple[float, str, int], str] = {}
        for frac in cfg.budget_fractions:
            budget = max(1, int(round(frac * ntotal)))
            t = time.time()
            sel_dir = os.path.join(out, f"selection-{frac:g}")
            select(
                SelectConfig(index=index, encoder=encoder, target=cfg.target, budget=budget, out=sel_dir, task="target")
            )
            timings[f"select-{frac:g}"] = time.time() - t
            entry = results["fractions"].setdefault(f"{frac:g}", dict(budget=budget, arms={}))
            if truth and cfg.truth_label:
                entry["selection_precision"] = selection_precision(
                    os.path.join(task_dir(sel_dir, "target"), MANIFEST), truth, cfg.truth_label
                )
                entry["base_rate"] = float(np.mean([v == cfg.truth_label for v in truth.values()]))
            for seed in range(cfg.seeds):
                data[(frac, "selected", seed)] = os.path.join(sel_dir, SHARDS_DIR)
                if "random" in cfg.arms:
                    data[(frac, "random", seed)] = random_subset(
                        emb, budget, pool, os.path.join(out, f"random-{frac:g}-s{seed}"), seed
                    )
                data[(frac, "full", seed)] = cfg.pool
    for seed in range(cfg.seeds):
        arm = _arm_config(cfg.pool, out, cfg, seed)
        untrained = untrained_encoder(
            os.path.join(out, f"untrained-s{seed}.pt"), seed, arch=arm.arch, width=arm.width, image_size=arm.image_size
        )
        floor = evaluate(untrained, cfg.target)
        results["floor"].append(dict(seed=seed, linear_probe=floor["linear_probe"], knn=floor["knn"]))
    # Every arm of every fraction and seed, planned first so they can train as one job array.
    planned: dict[tuple[str, str, int], tuple[str, str, int, int]] = {}
    for frac in cfg.budget_fractions:
        budget = results["fractions"][f"{frac:g}"]["budget"]
        for arm in cfg.arms:
            for seed in range(cfg.seeds):
                if arm == "full":  # the same for every fraction: trained once per seed
                    planned[(f"{frac:g}", arm, seed)] = (
                        cfg.pool,
                        os.path.join(out, "runs", f"full-s{seed}"),
                        seed,
                        ntotal,
                    )
                else:
                    planned[(f"{frac:g}", arm, seed)] = (
                        data[(frac, arm, seed)],
                        os.path.join(out, "runs", f"{arm}-{frac:g}-s{seed}"),
                        seed,
                        budget,
                    )
    unique = list({run[1]: run for run in planned.values()}.values())
    trained = pretrain_arms(unique, cfg.target, cfg, out, job)
    for (frac, arm, seed), run in planned.items():
        results["fractions"][frac]["arms"].setdefault(arm, []).append(dict(trained[run[1]], seed=seed))
    _write_json(os.path.join(out, "results.json"), results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(format_results(results) + "\n")
    plot_results(results, os.path.join(out, "results.png"))
    return results


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _cell(values: list[float]) -> str:
    """Mean ± sample standard deviation; one seed has no spread to show."""
    mean, std = mean_std(values)
    return f"{mean:.1%} ± {std:.1%}" if len(values) > 1 else f"{mean:.1%}"


def format_results(results: dict) -> str:
    lines = ["| budget | arm | images | linear probe | kNN |", "|---|---|---|---|---|"]
    for frac, entry in results["fractions"].items():
        for arm, runs in entry["arms"].items():
            lines.append(
                f"| {frac} | {arm} | {runs[0]['images']} | {_cell([r['linear_probe'] for r in runs])} | "
                f"{_cell([r['knn'] for r in runs])} |"
            )
    floor = results["floor"]
    lines.append(
        f"| - | no pre-training | 0 | {_cell([r['linear_probe'] for r in floor])} | "
        f"{_cell([r['knn'] for r in floor])} |"
    )
    for frac, entry in results["fractions"].items():
        if "selection_precision" in entry:
            lines.append(
                f"\nSelection precision at budget {frac}: {entry['selection_precision']:.1%} "
                f"(pool base rate {entry['base_rate']:.1%})"
            )
    return "\n".join(lines)


def plot_results(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    labels, means, stds = [], [], []
    for frac, entry in results["fractions"].items():
        for arm, runs in entry["arms"].items():
            m, s = mean_std([r["linear_probe"] for r in runs])
            labels.append(f"{arm}\n{frac}")
            means.append(m)
            stds.append(s)
    m, s = mean_std([r["linear_probe"] for r in results["floor"]])
    labels.append("no\npre-training")
    means.append(m)
    stds.append(s)
    bars.bar(range(len(means)), means, yerr=stds, capsize=4, color="tab:blue")
    bars.set_xticks(range(len(means)), labels, fontsize=8)
    bars.set_ylabel("linear-probe accuracy")
    bars.set_title("target accuracy by arm (mean ± std over seeds)")
    for frac, entry in results["fractions"].items():
        for arm, runs in entry["arms"].items():
            steps = [p["step"] for p in runs[0]["curve"]]
            if not steps:
                continue
            knn = np.mean([[p["knn"] for p in r["curve"]] for r in runs], axis=0)
            curves.plot(steps, knn, marker="o", label=f"{arm} ({frac})")
    curves.set_xlabel("pre-training step")
    curves.set_ylabel("kNN accuracy")
    curves.set_title("kNN accuracy over training")
    if curves.lines:
        curves.legend(fontsize=8)
    else:  # arms launched through submitit report their final scores only
        curves.text(
            0.5,
            0.5,
            "tracked with --executor inprocess only",
            ha="center",
            va="center",
            transform=curves.transAxes,
            color="gray",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
