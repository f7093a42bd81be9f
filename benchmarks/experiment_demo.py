"""Does selection pay on the demo corpus? `sept experiment` with all three arms and three seeds.

    .venv/bin/python benchmarks/experiment_demo.py --workdir work/experiment_demo

Its defaults are the demo experiment: 3000 steps per arm with ``configs/demo-digits-16px.yaml``
(the settings under which pre-training learns the digits at all; at 1000 steps the arms do not
differ), scored on 50 val images per class: about 20 minutes on 2 CPU cores. Makes the demo corpus of ``sept demo``
(same sizes, ``sept.demo.DemoConfig``) and runs
``sept.experiment.run_experiment`` on it: one bootstrap, embed, index and select, then the
selected subset (10% of the pool), a random subset of the same size and the full pool, each
pre-trained with the same method, schedule and steps for every seed, plus the untrained floor.
It prints the table, the selected-vs-random margin in standard deviations and the gap to the
full pool, and copies results.md and results.png to ``--publish`` (the README's figure).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time

DEMO_EXPERIMENT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo-digits-16px.yaml")


def verdict(results: dict, fraction: str) -> dict:
    """Selected vs random (margin in pooled standard deviations) and vs full (points), linear probe."""
    from sept.experiment import mean_std

    out: dict = {}
    for arm, runs in results["fractions"][fraction]["arms"].items():
        mean, std = mean_std([r["linear_probe"] for r in runs])
        out[arm] = dict(mean=mean, std=std)
    if "selected" in out and "random" in out:
        spread = max(out["selected"]["std"], out["random"]["std"], 1e-9)
        out["selected_minus_random"] = out["selected"]["mean"] - out["random"]["mean"]
        out["margin_in_std"] = out["selected_minus_random"] / spread
    if "selected" in out and "full" in out:
        out["full_minus_selected_points"] = 100 * (out["full"]["mean"] - out["selected"]["mean"])
    return out


def main(argv: list[str] | None = None) -> None:
    from sept.data.demo_corpus import DemoCorpusParams, make_demo_corpus
    from sept.demo import DemoConfig
    from sept.experiment import ExperimentConfig, format_results, run_experiment

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="work/experiment_demo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=3000,
        help="steps per arm (default: %(default)s; at 1000 the arms do not differ, RESULTS.md)",
    )
    parser.add_argument(
        "--pretrain-config",
        default=DEMO_EXPERIMENT_CONFIG,
        metavar="YAML",
        help="pre-training settings for every arm (sept experiment --pretrain-config; default: %(default)s)",
    )
    parser.add_argument(
        "--target-val-per-class",
        type=int,
        default=50,
        help="val images per digit class that score the arms (default: %(default)s; "
        f"sept demo's {DemoCorpusParams.target_val_per_class} measure to about +-5 points)",
    )
    parser.add_argument(
        "--publish",
        default=None,
        help="copy results.md and results.png into this folder as experiment-demo.md and "
        "experiment-demo.png (docs/: the README's table and figure)",
    )
    args = parser.parse_args(argv)
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
    results = run_experiment(
        ExperimentConfig(
            pool=corpus.pool_spec,
            target=corpus.target_dir,
            out=os.path.join(args.workdir, "experiment"),
            budget_fractions=[args.budget_fraction],
            seeds=args.seeds,
            bootstrap_samples=demo.bootstrap_samples,
            bootstrap_steps=demo.bootstrap_steps,
            pretrain_steps=args.pretrain_steps,
            batch_size=demo.batch_size,
            pretrain_config=args.pretrain_config,
            truth=corpus.truth_path,
            truth_label=corpus.target_domain,
        )
    )
    wall = time.time() - started
    v = verdict(results, f"{args.budget_fraction:g}")
    print(format_results(results))
    print(
        f"\nselected - random: {100 * v.get('selected_minus_random', float('nan')):+.1f} points "
        f"= {v.get('margin_in_std', float('nan')):.1f} standard deviations (goal: > 2)"
    )
    print(f"full - selected: {v.get('full_minus_selected_points', float('nan')):+.1f} points (goal: < 1)")
    print(f"wall time: {wall / 60:.1f} min (goal: <= 30)")
    with open(os.path.join(args.workdir, "verdict.json"), "w") as f:
        json.dump(dict(verdict=v, wall_s=wall), f, indent=2)
    if args.publish:
        os.makedirs(args.publish, exist_ok=True)
        for ext in (".md", ".png"):
            shutil.copyfile(
                os.path.join(args.workdir, "experiment", f"results{ext}"),
                os.path.join(args.publish, f"experiment-demo{ext}"),
            )


if __name__ == "__main__":
    main()
