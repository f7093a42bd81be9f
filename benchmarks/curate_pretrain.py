"""Does balanced curation pay in pre-training? Curated against random of equal size on the demo corpus.

    .venv/bin/python benchmarks/curate_pretrain.py --workdir work/curate_pretrain

The demo experiment's corpus and settings (``benchmarks/experiment_demo.py``: 3000 pool images,
a quarter digits; 3000 steps per arm with ``configs/demo-digits-16px.yaml``; 50 val images per
class). ``sept.experiment.run_experiment`` runs once with its random arm: bootstrap, embed, index,
the target's selection, a uniform random subset of 10% of the pool per seed, pre-trained and
scored (linear probe and kNN on the digits target), and the untrained floor. Then, from the same
embeddings, ``sept curate`` draws a balanced generic subset of the same size for every seed (its
resolved defaults, ``--seed SEED``), and each is pre-trained and scored the same way
(``sept.experiment.pretrain_arms``); ``--arms`` adds the target's own selection (``sept select``)
for context. Printed: per arm the domain make-up of the subsets, the linear probe per seed, its
mean and range, kNN, and curated minus random. Everything resumes from the files it leaves.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
from experiment_demo import DEMO_EXPERIMENT_CONFIG

ARMS = ("curated", "random", "selected")


def domain_counts(manifest: str, truth: dict[str, str]) -> list[int]:
    """Samples per demo domain (digits, shapes, textures, gradients) in a selection manifest."""
    from sept.data.demo_corpus import DOMAINS

    with open(manifest) as f:
        found = [truth[json.loads(line)["key"]] for line in f]
    return [found.count(d) for d in DOMAINS]


def summarize(runs: list[dict]) -> dict:
    probe = [r["linear_probe"] for r in runs]
    return dict(
        linear_probe=probe,
        mean=float(np.mean(probe)),
        min=float(np.min(probe)),
        max=float(np.max(probe)),
        knn=float(np.mean([r["knn"] for r in runs])),
    )


def format_table(arms: dict[str, dict], floor: dict) -> str:
    lines = [
        "| arm | images | domains, digits/shapes/textures/gradients (per seed) | linear probe, seeds 0 / 1 / 2 "
        "| linear probe, mean [range] | kNN, mean |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in list(arms.items()) + [("no pre-training", floor)]:
        make_up = "; ".join("/".join(map(str, c)) for c in a.get("domains", [])) or "-"
        lines.append(
            f"| {name} | {a.get('images', 0)} | {make_up} | {' / '.join(f'{100 * v:.1f}' for v in a['linear_probe'])} "
            f"| {a['mean']:.1%} [{a['min']:.1%}, {a['max']:.1%}] | {a['knn']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from sept.cluster.curate import TASK, CurateConfig, curate
    from sept.data.demo_corpus import make_demo_corpus
    from sept.data.selection_folder import MANIFEST, SHARDS_DIR, task_dir
    from sept.demo import DemoConfig
    from sept.experiment import ExperimentConfig, pretrain_arms, run_experiment

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="work/curate_pretrain")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument("--pretrain-steps", type=int, default=3000, help="steps per arm (default: %(default)s)")
    parser.add_argument("--pretrain-config", default=DEMO_EXPERIMENT_CONFIG, metavar="YAML")
    parser.add_argument("--target-val-per-class", type=int, default=50)
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS),
        help="arms to pre-train, in this order: curated and selected after random (default: all)",
    )
    args = parser.parse_args(argv)
    if "random" not in args.arms:
        parser.error("--arms must include random: it is the comparison")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    demo = DemoConfig()
    started = time.time()
    corpus = make_demo_corpus(
        os.path.join(args.workdir, "corpus"),
        pool_size=demo.pool_size,
        shards=demo.pool_shards,
        seed=demo.seed,
        target_val_per_class=args.target_val_per_class,
    )
    truth = corpus.truth()
    cfg = ExperimentConfig(
        pool=corpus.pool_spec,
        target=corpus.target_dir,
        out=os.path.join(args.workdir, "experiment"),
        budget_fractions=[args.budget_fraction],
        seeds=args.seeds,
        arms=["random"],
        bootstrap_samples=demo.bootstrap_samples,
        bootstrap_steps=demo.bootstrap_steps,
        pretrain_steps=args.pretrain_steps,
        batch_size=demo.batch_size,
        pretrain_config=args.pretrain_config,
        truth=corpus.truth_path,
        truth_label=corpus.target_domain,
    )
    out, frac = os.path.abspath(cfg.out), f"{args.budget_fraction:g}"
    # bootstrap, embed, index, select, the random arm and the floor: sept experiment's own path
    results = run_experiment(cfg)
    budget = results["fractions"][frac]["budget"]
    arms: dict[str, dict] = {}
    runs = results["fractions"][frac]["arms"]["random"]
    arms["random"] = dict(
        summarize(runs),
        images=budget,
        domains=[domain_counts(os.path.join(out, f"random-{frac}-s{s}", MANIFEST), truth) for s in range(args.seeds)],
    )

    planned: dict[str, list[tuple[str, str, int, int]]] = {}
    manifests: dict[str, list[str]] = {}
    if "curated" in args.arms:
        t = time.time()
        planned["curated"], manifests["curated"] = [], []
        for seed in range(args.seeds):
            cur = os.path.join(args.workdir, f"curated-s{seed}")
            curate(CurateConfig(embeddings=os.path.join(out, "embeddings.zarr"), size=budget, out=cur, seed=seed))
            planned["curated"].append(
                (task_dir(cur, TASK), os.path.join(out, "runs", f"curated-{frac}-s{seed}"), seed, budget)
            )
            manifests["curated"].append(os.path.join(task_dir(cur, TASK), MANIFEST))
        logging.info("curated %d subsets of %d in %.1fs", args.seeds, budget, time.time() - t)
    if "selected" in args.arms:  # where run_experiment puts this arm: a later `sept experiment` resumes it
        sel = os.path.join(out, f"selection-{frac}")
        planned["selected"] = [
            (os.path.join(sel, SHARDS_DIR), os.path.join(out, "runs", f"selected-{frac}-s{s}"), s, budget)
            for s in range(args.seeds)
        ]
        manifests["selected"] = [os.path.join(task_dir(sel, "target"), MANIFEST)] * args.seeds
    for name in ("curated", "selected"):
        if name in planned:
            trained = pretrain_arms(planned[name], cfg.target, cfg, out)
            arms[name] = dict(
                summarize([trained[run[1]] for run in planned[name]]),
                images=budget,
                domains=[domain_counts(m, truth) for m in manifests[name]],
            )
    floor = dict(summarize(results["floor"]), images=0)
    wall = time.time() - started

    print(format_table(arms, floor))
    if "curated" in arms:
        diff = [c - r for c, r in zip(arms["curated"]["linear_probe"], arms["random"]["linear_probe"])]
        print(
            f"\ncurated - random, linear probe: {100 * np.mean(diff):+.1f} points "
            f"(per seed {' / '.join(f'{100 * d:+.1f}' for d in diff)}); "
            f"kNN {100 * (arms['curated']['knn'] - arms['random']['knn']):+.1f} points"
        )
    print(f"wall time: {wall / 60:.1f} min")
    with open(os.path.join(args.workdir, "curate_pretrain.json"), "w") as f:
        json.dump(dict(arms=arms, floor=floor, wall_s=wall, timings=results["timings"]), f, indent=2)


if __name__ == "__main__":
    main()
