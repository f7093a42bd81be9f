"""sept demo: every stage of the pipeline on the generated demo corpus, ending in a comparison table.

It makes the demo corpus, then runs `sept experiment`'s pipeline with two arms and one seed:
the same model pre-trained for the same number of steps (plain SimCLR with ``DEMO_PRETRAIN``,
launched through submitit) on the selected subset and on a random subset of the same size, plus
an untrained floor, all scored by linear probe and kNN on the target's val split. It prints
`sept index eval`'s recall table, the selection's precision against the pool's base rate and the
arms' accuracies, and writes the selection report. Everything lands under WORKDIR and a rerun
resumes.

Why these settings: they are the ones under which self-supervised pre-training learns the
demo's digit classes at all on a CPU, and under which pre-training on the target's domain beats
pre-training on other domains (``benchmarks/selection_premise.py``; benchmarks/RESULTS.md, "Does
selection pay?"). The `fast` preset is not used: at the demo's length it ends far below plain
SimCLR. Nor is DetCon: it ends a little above SimCLR at equal steps, at twice the time per step
on a CPU (benchmarks/RESULTS.md, "Time to accuracy at 16 px").
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from sept.training.job_shape import JobShape

log = logging.getLogger(__name__)


DEMO_PRETRAIN: dict = dict(
    image_size=16,  # 4x cheaper steps than 32 px; the corpus's 8x8 glyphs lose nothing
    color_jitter=1.0,  # at 0.5 the digits' random colours are a shortcut the loss learns instead
    crop_min_scale=0.6,  # a 20% crop of a digit image often holds no stroke at all
    optimizer="adamw",
    lr=0.002,
)
"""Pre-training settings of the demo's arms, the same as ``benchmarks/configs/demo-digits-16px.yaml``."""


@dataclass
class DemoConfig:
    """The demo's sizes: a whole run, install included, in at most 10 minutes on 2 CPU cores."""

    pool_size: int = 3000
    pool_shards: int = 6
    budget_fraction: float = 0.1
    target_val_per_class: int = 50  # 500 val images: one image is 0.2 points
    bootstrap_samples: int = 2000
    bootstrap_steps: int = 300
    pretrain_steps: int = 2000  # the premise holds from 2000 steps on (at 1000 the arms do not differ)
    batch_size: int = 64
    method: str = "simclr"
    preset: str | None = None
    index_eval_queries: int = 200
    seed: int = 0


def make_corpus(workdir: str, cfg: DemoConfig | None = None):
    """The demo corpus in ``WORKDIR/corpus`` (kept if it is already there)."""
    from sept.data.demo_corpus import make_demo_corpus

    cfg = cfg or DemoConfig()
    return make_demo_corpus(
        os.path.join(os.path.abspath(workdir), "corpus"),
        pool_size=cfg.pool_size,
        shards=cfg.pool_shards,
        seed=cfg.seed,
        target_val_per_class=cfg.target_val_per_class,
    )


def run_demo(
    workdir: str,
    *,
    executor: str = "local",
    ray_address: str | None = None,
    cfg: DemoConfig | None = None,
    job: JobShape | None = None,
) -> dict:
    from sept.experiment import ExperimentConfig, format_results, run_experiment

    cfg = cfg or DemoConfig()
    t0 = time.time()
    workdir = os.path.abspath(workdir)
    corpus = make_corpus(workdir, cfg)
    results = run_experiment(
        ExperimentConfig(
            pool=corpus.pool_spec,
            target=corpus.target_dir,
            out=os.path.join(workdir, "experiment"),
            budget_fractions=[cfg.budget_fraction],
            seeds=1,
            arms=["selected", "random"],
            bootstrap_samples=cfg.bootstrap_samples,
            bootstrap_steps=cfg.bootstrap_steps,
            pretrain_steps=cfg.pretrain_steps,
            batch_size=cfg.batch_size,
            method=cfg.method,
            preset=cfg.preset,
            pretrain_settings=dict(DEMO_PRETRAIN),
            executor=executor,
            ray_address=ray_address,
            truth=corpus.truth_path,
            truth_label=corpus.target_domain,
        ),
        job=job,
    )
    from sept.index.eval import EvalConfig, evaluate_index, format_eval_table

    experiment = os.path.join(workdir, "experiment")
    index_eval = evaluate_index(
        EvalConfig(
            index=os.path.join(experiment, "index.zarr"),
            embeddings=os.path.join(experiment, "embeddings.zarr"),
            queries=cfg.index_eval_queries,
        )
    )
    from sept.data.report import ReportConfig, write_report

    for frac in results["fractions"]:
        selection = os.path.join(workdir, "experiment", f"selection-{frac}")
        write_report(
            ReportConfig(
                selection=selection,
                out=os.path.join(workdir, "report"),
                truth=corpus.truth_path,
                domain=corpus.target_domain,
            )
        )
    print()
    print(
        f"sept demo on {cfg.pool_size} pool images, target: {corpus.target_domain} "
        f"({time.time() - t0:.0f} s; everything is in {workdir})"
    )
    print("\nsept index eval (recall against exact search on held-out pool vectors):")
    print(format_eval_table(index_eval))
    print()
    print(
        f"pre-training: {cfg.method} (no preset), {cfg.pretrain_steps} steps of batch {cfg.batch_size} per arm, "
        f"{DEMO_PRETRAIN['image_size']} px; the fast preset ends below plain SimCLR at this length and DetCon "
        "costs twice the time per step, so both are off (benchmarks/RESULTS.md)"
    )
    print(format_results(results))
    arms = next(iter(results["fractions"].values()))["arms"]
    if "selected" in arms and "random" in arms:
        margin = {m: 100 * (arms["selected"][0][m] - arms["random"][0][m]) for m in ("linear_probe", "knn")}
        print(
            f"selected - random: {margin['linear_probe']:+.1f} linear-probe points, {margin['knn']:+.1f} kNN points "
            f"(val split: {cfg.target_val_per_class} images per class)"
        )
    print(f"selection report: {os.path.join(workdir, 'report', 'index.html')}")
    return results
