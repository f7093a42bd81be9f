"""sept demo: every stage of the pipeline on the generated demo corpus, ending in a comparison table.

It makes the demo corpus, then runs `sept experiment`'s pipeline with two arms and one seed:
the same model pre-trained for the same number of steps (DetCon with the `fast` preset, launched
through submitit) on the selected subset and on a random subset of the same size, plus an
untrained floor, all scored on the target task. It prints `sept index eval`'s recall table, the
selection's precision against the pool's base rate and the arms' accuracies, and writes the
selection report. Everything lands under WORKDIR and a rerun resumes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """The demo's sizes, chosen to finish in a few minutes on 2 CPU cores."""

    pool_size: int = 3000
    pool_shards: int = 6
    budget_fraction: float = 0.1
    bootstrap_samples: int = 2000
    bootstrap_steps: int = 300
    pretrain_steps: int = 150
    batch_size: int = 64
    method: str = "detcon"  # DetCon-S over Felzenszwalb-Huttenlocher masks (sept.training.detcon)
    preset: str | None = "fast"  # the acceleration strategies of arXiv 2212.05611
    index_eval_queries: int = 200
    seed: int = 0


def run_demo(workdir: str, *, executor: str = "local", ray_address: str | None = None,
             cfg: DemoConfig | None = None) -> dict:
    from sept.data.demo_corpus import make_demo_corpus
    from sept.experiment import ExperimentConfig, format_results, run_experiment

    cfg = cfg or DemoConfig()
    t0 = time.time()
    workdir = os.path.abspath(workdir)
    corpus = make_demo_corpus(os.path.join(workdir, "corpus"), pool_size=cfg.pool_size, shards=cfg.pool_shards,
                              seed=cfg.seed)
    results = run_experiment(ExperimentConfig(
        pool=corpus.pool_spec, target=corpus.target_dir, out=os.path.join(workdir, "experiment"),
        budget_fractions=[cfg.budget_fraction], seeds=1, arms=["selected", "random"],
        bootstrap_samples=cfg.bootstrap_samples, bootstrap_steps=cfg.bootstrap_steps,
        pretrain_steps=cfg.pretrain_steps, batch_size=cfg.batch_size, method=cfg.method, preset=cfg.preset,
        executor=executor, ray_address=ray_address, truth=corpus.truth_path, truth_label=corpus.target_domain))
    from sept.index.eval import EvalConfig, evaluate_index, format_eval_table

    experiment = os.path.join(workdir, "experiment")
    index_eval = evaluate_index(EvalConfig(index=os.path.join(experiment, "index.zarr"),
                                           embeddings=os.path.join(experiment, "embeddings.zarr"),
                                           queries=cfg.index_eval_queries))
    from sept.data.report import ReportConfig, write_report

    for frac in results["fractions"]:
        selection = os.path.join(workdir, "experiment", f"selection-{frac}")
        write_report(ReportConfig(selection=selection, out=os.path.join(workdir, "report"), truth=corpus.truth_path,
                                  domain=corpus.target_domain))
    print()
    print(f"sept demo on {cfg.pool_size} pool images, target: {corpus.target_domain} "
          f"({time.time() - t0:.0f} s; everything is in {workdir})")
    print("\nsept index eval (recall against exact search on held-out pool vectors):")
    print(format_eval_table(index_eval))
    print()
    print(format_results(results))
    print(f"selection report: {os.path.join(workdir, 'report', 'index.html')}")
    return results
