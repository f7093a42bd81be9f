"""sept demo: every stage of the pipeline on the generated demo corpus, ending in a comparison table.

It pre-trains the same model for the same number of steps on (a) the selected subset and
(b) a random subset of the pool of the same size, and evaluates both, plus an untrained
encoder, on the target task. Every stage writes under WORKDIR and is resumed by a rerun.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

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
    index_shards: int = 2
    seed: int = 0


def selection_precision(manifest_path: str, truth: dict[str, str], domain: str) -> float:
    with open(manifest_path) as f:
        keys = [json.loads(line)["key"] for line in f]
    return float(np.mean([truth[k] == domain for k in keys])) if keys else 0.0


def random_subset(embeddings: str, budget: int, pool: list[str], out_dir: str, seed: int) -> str:
    """Materialize `budget` pool samples drawn uniformly, as the random arm's training data."""
    from sept.cluster.materialize import materialize
    from sept.index.embedding_store import EmbeddingStore

    _, ids = EmbeddingStore.open(embeddings).read_all()
    chosen = np.sort(np.random.default_rng(seed).choice(ids, size=budget, replace=False))
    shards = os.path.join(out_dir, "shards")
    rows = materialize(chosen, pool, shards)
    with open(os.path.join(out_dir, "manifest.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return shards


def run_demo(workdir: str, *, executor: str = "local", ray_address: str | None = None,
             cfg: DemoConfig | None = None) -> dict:
    from sept.cluster.embed import EmbedConfig, embed_pool
    from sept.cluster.index_build import IndexConfig, build_index
    from sept.cluster.runtime import ray_session
    from sept.cluster.select import SelectConfig, select
    from sept.data.demo_corpus import make_demo_corpus
    from sept.index.spec import IndexSpec
    from sept.training.bootstrap import bootstrap
    from sept.training.config import load_config
    from sept.training.encoder import build_backbone, save_encoder
    from sept.training.evaluate import evaluate
    from sept.training.launcher import launch_pretrain

    cfg = cfg or DemoConfig()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name: str):
        timings[name] = time.time()
        log.info("demo: === %s ===", name)

    stage("corpus")
    corpus = make_demo_corpus(os.path.join(workdir, "corpus"), pool_size=cfg.pool_size, shards=cfg.pool_shards,
                              seed=cfg.seed)
    with open(corpus.truth_path) as f:
        truth = json.load(f)
    encoder = os.path.join(workdir, "encoder.pt")
    stage("bootstrap")
    if not os.path.exists(encoder):
        bootstrap(corpus.pool_spec, encoder, sample_size=cfg.bootstrap_samples, steps=cfg.bootstrap_steps,
                  seed=cfg.seed, batch_size=cfg.batch_size)
    budget = int(cfg.budget_fraction * cfg.pool_size)
    with ray_session(ray_address):
        stage("embed")
        emb = os.path.join(workdir, "embeddings.zarr")
        embed_pool(EmbedConfig(pool=corpus.pool_spec, encoder=encoder, out=emb, ray_address=ray_address))
        stage("index")
        index = os.path.join(workdir, "index.zarr")
        build_index(IndexConfig(embeddings=emb, out=index, spec=IndexSpec(shards=cfg.index_shards, seed=cfg.seed)))
        stage("select")
        selection = os.path.join(workdir, "selection")
        summary = select(SelectConfig(index=index, encoder=encoder, target=corpus.target_dir, budget=budget,
                                      out=selection, task="digits"))
        stage("random subset")
        from sept.index.store import IndexStore

        random_dir = os.path.join(workdir, "random")
        random_shards = random_subset(emb, budget, IndexStore.open(index).attrs["pool"], random_dir, cfg.seed)
    precision = selection_precision(os.path.join(selection, "tasks", "digits", "manifest.jsonl"), truth,
                                    corpus.target_domain)
    base_rate = float(np.mean([d == corpus.target_domain for d in truth.values()]))

    rows = []
    untrained = os.path.join(workdir, "untrained.pt")
    if not os.path.exists(untrained):
        import torch

        torch.manual_seed(cfg.seed)
        backbone, _ = build_backbone("resnet18_small")
        save_encoder(untrained, backbone, arch="resnet18_small", image_size=32, mean=(0.5, 0.5, 0.5),
                     std=(0.25, 0.25, 0.25))
    stage("evaluate untrained")
    rows.append(("no pre-training", 0, evaluate(untrained, corpus.target_dir)))
    for arm, data in (("random subset", random_shards), ("selected subset", os.path.join(selection, "shards"))):
        stage(f"pretrain {arm}")
        run_dir = os.path.join(workdir, "runs", arm.split()[0])
        pcfg = load_config(None, dict(data=data, out=run_dir, steps=cfg.pretrain_steps, batch_size=cfg.batch_size,
                                      seed=cfg.seed))
        launch_pretrain(pcfg, executor=executor, nodes=1)
        rows.append((arm, budget, evaluate(os.path.join(run_dir, "encoder.pt"), corpus.target_dir)))
    timings["end"] = time.time()

    names = list(timings)
    stage_seconds = {n: round(timings[b] - timings[n], 1) for n, b in zip(names, names[1:])}
    result = dict(budget=budget, pool=cfg.pool_size, selection_precision=precision, base_rate=base_rate,
                  arms={name: metrics for name, _, metrics in rows}, seconds=stage_seconds, selection=summary)
    with open(os.path.join(workdir, "demo_results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(format_table(rows, precision, base_rate, corpus.target_domain))
    return result


def format_table(rows, precision: float, base_rate: float, domain: str) -> str:
    lines = [
        f"Selection precision ({domain} among selected): {precision:.1%}   pool base rate: {base_rate:.1%}",
        "",
        f"{'pre-training data':<18} {'images':>7} {'linear probe':>13} {'kNN':>7}",
        f"{'-' * 18} {'-' * 7} {'-' * 13} {'-' * 7}",
    ]
    for name, n, m in rows:
        lines.append(f"{name:<18} {n:>7} {m['linear_probe']:>13.1%} {m['knn']:>7.1%}")
    return "\n".join(lines)
