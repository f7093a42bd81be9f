"""Can any selection pay on this corpus? Pre-training on the target's domain only vs on no target
images at all, at the experiment's budget, before asking whether sept's selection pays.

SEPT's premise is that self-supervised pre-training on images like the target's teaches more
about the target than pre-training on other images. `sept experiment` can only show selection
paying where that premise holds. This benchmark tests it directly with the corpus's ground truth
(``truth.json``, never seen by sept), for every seed:
  in-domain:  ``--budget`` pool images all from the target domain (a perfect selection);
  off-domain: ``--budget`` pool images none of which is from the target domain;
  random:     ``--budget`` pool images drawn uniformly;
each pre-trained with the same method, steps and settings, then scored with a linear probe and
kNN on the target's val split (as `sept experiment` scores its arms). If in-domain does not beat
off-domain, no retrieval encoder can make selected beat random on this corpus at this budget.

    .venv/bin/python benchmarks/selection_premise.py --workdir /tmp/sept-premise
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import webdataset as wds


def write_subset(pool_shards: list[str], keys: set[str], out_dir: str) -> str:
    """One tar in ``out_dir`` holding the pool samples named in ``keys``, members byte for byte."""
    from sept.data.samples import iter_samples

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "00000.tar")
    if not os.path.exists(path):
        with wds.TarWriter(path + ".tmp") as writer:
            for shard in pool_shards:
                for sample in iter_samples(shard):
                    if sample.key in keys:
                        writer.write({"__key__": sample.key, **sample.members})
        os.replace(path + ".tmp", path)
    return out_dir


def draw_arms(truth: dict[str, str], domain: str, budget: int, seed: int) -> dict[str, set[str]]:
    rng = np.random.default_rng(seed)
    keys = sorted(truth)
    inside = [k for k in keys if truth[k] == domain]
    outside = [k for k in keys if truth[k] != domain]
    return {
        "in-domain": set(rng.choice(inside, budget, replace=False).tolist()),
        "off-domain": set(rng.choice(outside, budget, replace=False).tolist()),
        "random": set(rng.choice(keys, budget, replace=False).tolist()),
    }


def main(argv: list[str] | None = None) -> None:
    from sept.data.demo_corpus import make_demo_corpus
    from sept.data.shards import list_shards
    from sept.demo import DemoConfig
    from sept.experiment import mean_std
    from sept.training.config import load_config
    from sept.training.evaluate import evaluate
    from sept.training.trainer import train

    demo = DemoConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/sept-premise")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=300, help="images per arm (the demo's 10%% budget)")
    parser.add_argument("--steps", type=int, default=demo.pretrain_steps)
    parser.add_argument("--method", default="simclr")
    parser.add_argument(
        "--no-random",
        action="store_true",
        help="skip the random arm (in-domain against off-domain alone decides the verdict)",
    )
    parser.add_argument(
        "--target-val-per-class",
        type=int,
        default=10,
        help="val images per digit class (the demo's 10 measure to about +-5 points per run)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="further PretrainConfig values for every arm, e.g. image_size=16 color_jitter=1.0",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    corpus = make_demo_corpus(
        os.path.join(args.workdir, f"corpus-val{args.target_val_per_class}"),
        pool_size=demo.pool_size,
        shards=demo.pool_shards,
        seed=demo.seed,
        target_val_per_class=args.target_val_per_class,
    )
    pool = list_shards(corpus.pool_spec)
    extra = dict(kv.split("=", 1) for kv in args.set)
    results: dict[str, list[dict]] = {}
    started = time.time()
    for seed in range(args.seeds):
        for arm, keys in draw_arms(corpus.truth(), corpus.target_domain, args.budget, seed).items():
            if arm == "random" and args.no_random:
                continue
            data = write_subset(pool, keys, os.path.join(args.workdir, "subsets", f"{arm}-s{seed}"))
            run_dir = os.path.join(args.workdir, "runs", f"{arm}-s{seed}")
            cfg = load_config(
                None,
                dict(
                    extra,
                    data=data,
                    out=run_dir,
                    steps=args.steps,
                    seed=seed,
                    batch_size=demo.batch_size,
                    method=args.method,
                ),
            )
            train(cfg, distributed_run=False)
            scores = evaluate(os.path.join(run_dir, "encoder.pt"), corpus.target_dir)
            results.setdefault(arm, []).append(dict(seed=seed, linear_probe=scores["linear_probe"], knn=scores["knn"]))
            print(
                f"seed {seed} {arm:>10}: linear probe {scores['linear_probe']:.3f}  kNN {scores['knn']:.3f}", flush=True
            )

    print(f"\n{args.method}, {args.steps} steps, {args.budget} images per arm, settings {extra or 'defaults'}")
    print("| arm | linear probe | kNN |\n|---|---|---|")
    summary = {}
    for arm, runs in results.items():
        (lp, lp_std), (knn, knn_std) = (mean_std([r[m] for r in runs]) for m in ("linear_probe", "knn"))
        summary[arm] = dict(linear_probe=lp, linear_probe_std=lp_std, knn=knn, knn_std=knn_std)
        print(f"| {arm} | {100 * lp:.1f}% ± {100 * lp_std:.1f} | {100 * knn:.1f}% ± {100 * knn_std:.1f} |")
    margin = summary["in-domain"]["linear_probe"] - summary["off-domain"]["linear_probe"]
    spread = max(summary["in-domain"]["linear_probe_std"], summary["off-domain"]["linear_probe_std"])
    verdict = (
        "holds"
        if margin > 2 * spread
        else "does not hold"
        if margin < -2 * spread
        else "is not shown (within two standard deviations)"
    )
    print(
        f"\nin-domain - off-domain (linear probe): {100 * margin:+.1f} points, {100 * spread:.1f} the larger "
        f"standard deviation; the premise {verdict} here. Wall time {(time.time() - started) / 60:.1f} min"
    )
    with open(os.path.join(args.workdir, "premise.json"), "w") as f:
        json.dump(dict(args=vars(args), runs=results, summary=summary, margin=margin, verdict=verdict), f, indent=2)


if __name__ == "__main__":
    main()
