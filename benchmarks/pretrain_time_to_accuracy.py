"""Time to accuracy at the demo's settings: the `fast` preset and each of its strategies, and
DetCon, against plain SimCLR, where pre-training learns the target (16 px, thousands of steps).

Every arm pre-trains the same 300 pool images of the demo corpus, all from the target's domain
(a perfect selection, drawn with the corpus's ground truth as ``selection_premise.py`` draws its
in-domain arm), with the demo's pre-training settings (``sept.demo.DEMO_PRETRAIN``: 16 px,
colour jitter 1.0, crop scale 0.6, AdamW 2e-3), batch 64, for ``--steps`` steps. Accuracy is
the kNN (k=20, cosine, temperature-weighted, as ``sept evaluate``) of the demo target's digit
classes: train images are the reference set, the val split (50 images per class) is scored.
The arms, per seed:

  baseline     plain SimCLR, cosine learning rate over --steps; its kNN at the end is the bar;
  cyclic       extendable cyclic learning rate, cycles of --cycle-steps;
  progressive  progressive resolution and augmentation magnitude (over the run, cosine lr);
  hard         hard positive mining (cosine lr);
  fast         the `fast` preset: all three together, cycles of --cycle-steps;
  detcon       DetCon-S (masks from Felzenszwalb-Huttenlocher segments), cosine lr.

Every arm's encoder is scored every --cycle-steps steps. Under the cyclic schedule a cycle's end
is exactly the end of a run extended one cycle at a time, so the first cycle end at or above the
bar is that arm's steps to the baseline's accuracy. Under the cosine schedule a mid-run snapshot
still has a high learning rate, so its first crossing overstates the steps a shorter run would
need (a conservative figure). Reported: steps to the bar per seed, the step speed-up (baseline
steps / steps to the bar; a seed that never reaches it counts as 1, an upper bound), the kNN of
every arm at equal steps, and the training wall time of each arm against the baseline's.

    .venv/bin/python benchmarks/pretrain_time_to_accuracy.py --workdir /tmp/sept-bench-tta
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

VARIANTS: dict[str, dict] = {
    "baseline": {},
    "cyclic": {"lr_schedule": "cyclic"},
    "progressive": {"progressive": True},
    "hard": {"hard_positives": True},
    "fast": {"preset": "fast"},
    "detcon": {"method": "detcon_s"},
}


def knn_scorer(target_dir: str):
    """kNN accuracy of an encoder file on the target (train as reference, val scored)."""
    from sept.data.targets import load_target
    from sept.training.encoder import load_encoder
    from sept.training.evaluate import knn_accuracy

    task = load_target(target_dir)
    train_images, val_images = task.load_images("train"), task.load_images("val")
    train_labels = np.asarray(task.labels("train"), dtype=np.int64)
    val_labels = np.asarray(task.labels("val"), dtype=np.int64)

    def score(encoder_path: str) -> float:
        bundle = load_encoder(encoder_path, device="cpu")
        return knn_accuracy(
            bundle.embed_images(train_images), train_labels, bundle.embed_images(val_images), val_labels, k=20
        )

    return score


def run_arm(name: str, data: str, run_dir: str, seed: int, args, score) -> dict:
    """Trains one arm (resuming a finished one from its result file) and scores it every --cycle-steps."""
    from sept.demo import DEMO_PRETRAIN
    from sept.training.config import load_config
    from sept.training.encoder import IMAGENET_MEAN, IMAGENET_STD, save_encoder
    from sept.training.trainer import train

    result_path = os.path.join(run_dir, "tta.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    variant = dict(VARIANTS[name])
    preset = variant.pop("preset", None)
    overrides = dict(
        DEMO_PRETRAIN,
        **variant,
        data=data,
        out=run_dir,
        steps=args.steps,
        seed=seed,
        batch_size=args.batch_size,
        log_every=100,
        checkpoint_every=args.steps,
    )
    if preset or variant.get("lr_schedule") == "cyclic":
        overrides["cycle_steps"] = args.cycle_steps
    cfg = load_config(None, overrides, preset=preset)
    marks = set(range(args.cycle_steps, args.steps + 1, args.cycle_steps))
    snapshots: list[tuple[int, str]] = []

    def snapshot(step: int, backbone) -> None:
        if step in marks:
            path = os.path.join(run_dir, f"encoder-step{step:06d}.pt")
            save_encoder(path, backbone, arch=cfg.arch, image_size=cfg.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            snapshots.append((step, path))

    started = time.perf_counter()
    summary = train(cfg, distributed_run=False, step_callback=snapshot)
    if summary.get("interrupted"):  # its checkpoint stays; a rerun resumes the arm
        raise SystemExit(f"{name} seed {seed} stopped by {summary['interrupted']} at step {summary.get('steps')}")
    wall = time.perf_counter() - started
    curve = [(step, score(path)) for step, path in snapshots]
    result = dict(arm=name, seed=seed, wall_s=round(wall, 1), curve=curve, final_knn=curve[-1][1])
    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(result_path + ".tmp", result_path)
    print(f"  seed {seed} {name:>11}: kNN " + " ".join(f"{k:.3f}" for _, k in curve) + f"  ({wall:.0f} s)", flush=True)
    return result


def steps_to(curve: list, bar: float) -> int | None:
    return next((step for step, knn in curve if knn >= bar), None)


def main(argv: list[str] | None = None) -> None:
    from selection_premise import draw_arms, write_subset  # run as a script, benchmarks/ is on sys.path

    from sept.data.demo_corpus import make_demo_corpus
    from sept.data.shards import list_shards
    from sept.demo import DemoConfig
    from sept.experiment import mean_std

    demo = DemoConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/sept-bench-tta")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=3000, help="steps of every arm (default: %(default)s)")
    parser.add_argument(
        "--cycle-steps",
        type=int,
        default=500,
        help="cycle length of the cyclic arms, and how often every arm is scored (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=demo.batch_size)
    parser.add_argument("--budget", type=int, default=300, help="images every arm pre-trains on")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    corpus = make_demo_corpus(
        os.path.join(args.workdir, "corpus"),
        pool_size=demo.pool_size,
        shards=demo.pool_shards,
        seed=demo.seed,
        target_val_per_class=demo.target_val_per_class,
    )
    score = knn_scorer(corpus.target_dir)
    pool = list_shards(corpus.pool_spec)
    started = time.time()
    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for seed in args.seeds:
        keys = draw_arms(corpus.truth(), corpus.target_domain, args.budget, seed)["in-domain"]
        data = write_subset(pool, keys, os.path.join(args.workdir, "subsets", f"in-domain-s{seed}"))
        for arm in args.arms:
            runs[arm].append(
                run_arm(arm, data, os.path.join(args.workdir, "runs", f"{arm}-s{seed}"), seed, args, score)
            )

    marks = [step for step, _ in runs[args.arms[0]][0]["curve"]]
    print(
        f"\nkNN on the digits target (val: {demo.target_val_per_class} per class), mean ± std over seeds "
        f"{args.seeds}, at steps {marks}"
    )
    print("| arm | " + " | ".join(str(m) for m in marks) + " | wall vs baseline |")
    print("|---|" + "---|" * (len(marks) + 1))
    base_wall = np.mean([r["wall_s"] for r in runs.get("baseline", [])]) if "baseline" in runs else None
    for arm, rs in runs.items():
        cells = []
        for i in range(len(marks)):
            m, s = mean_std([r["curve"][i][1] for r in rs])
            cells.append(f"{100 * m:.1f} ± {100 * s:.1f}")
        wall = np.mean([r["wall_s"] for r in rs])
        ratio = f"{wall / base_wall:.2f}x ({wall:.0f} s)" if base_wall else f"{wall:.0f} s"
        print(f"| {arm} | " + " | ".join(cells) + f" | {ratio} |")
    summary: dict = {}
    if "baseline" in runs:
        print(f"\nsteps to the baseline's final kNN (per seed {args.seeds}), step speed-up (target: 2.7x):")
        for arm, rs in runs.items():
            if arm == "baseline":
                continue
            reached = [steps_to(r["curve"], b["final_knn"]) for r, b in zip(rs, runs["baseline"])]
            speedups = np.array([args.steps / s if s else 1.0 for s in reached])
            summary[arm] = dict(
                steps=reached, speedups=speedups.tolist(), mean=float(speedups.mean()), std=float(speedups.std())
            )
            shown = " / ".join(str(s) if s else f">{args.steps}" for s in reached)
            print(
                f"  {arm:>11}: {shown}  speed-up {speedups.mean():.2f}x ± {speedups.std():.2f} "
                f"(min {speedups.min():.2f}x)"
            )
    print(f"wall time {(time.time() - started) / 60:.1f} min")
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
