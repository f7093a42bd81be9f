"""Retrieval quality on real images: does sept's default pipeline find the target's categories in a pool?

    .venv/bin/python benchmarks/retrieval_quality.py --workdir work/retrieval_quality

Pool: every Oxygen icon PNG at 32, 48 and 64 px (about 3,800 images) as WebDataset shards.
Target: Tango's 32x32 ``devices`` and ``places`` icons, alternating into train/ and val/.
Truth (kept aside): each pool image's category folder; ``devices`` and ``places`` are relevant,
about 11% of the pool. See ``icon_corpus.py``.

sept's real stages run on it in this process: ``bootstrap`` (with the target, so it keeps the
weights that retrieve the target's classes best), ``embed`` and ``index`` (Ray), ``select`` at a
budget of 10% of the pool. The selection's precision (share of relevant images) is printed next
to baselines from the same run, all selected with the same per-instance round robin:

* a colour histogram (8x8x8 RGB bins);
* a randomly initialised torchvision ResNet-18 at 64 px (three seeds: mean and range);
* a 16x16 grayscale thumbnail (mean-centred pixels), the strongest trivial feature we found;
* the pool's base rate (what a random selection gets).

Then the selection refinements of ``sept.index.query_refine`` are scored on sept's own
embeddings (in memory, exact search), so that the default can be chosen by measurement.
The table is printed and written to WORKDIR/results.md and results.json.
Nothing in sept knows about icons: the benchmark uses sept's defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from icon_corpus import make_icon_corpus  # noqa: E402
from selection_eval import (  # noqa: E402
    colour_histogram,
    grey_thumbnail,
    load_pool,
    precision,
    refinement_selections,
    round_robin,
)

log = logging.getLogger("retrieval_quality")
GOAL_FACTOR = 2.0


def _random_resnet18(images, queries, seed: int, size: int, workdir: str):
    import torch

    from sept.training.encoder import IMAGENET_MEAN, IMAGENET_STD, build_backbone, load_encoder, save_encoder

    torch.manual_seed(seed)
    backbone, _ = build_backbone("resnet18")
    path = os.path.join(workdir, f"random-resnet18-seed{seed}.pt")
    save_encoder(path, backbone, arch="resnet18", image_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    encoder = load_encoder(path, device="cpu")
    return encoder.embed_images(images, batch_size=128), encoder.embed_images(queries)


def run(workdir: str, *, budget_fraction: float = 0.1, seed: int = 0, random_seeds: int = 3,
        ray_address: str | None = None, bootstrap_steps: int | None = None) -> dict:
    from sept.cluster.embed import EmbedConfig, embed_pool
    from sept.cluster.index_build import IndexConfig, build_index
    from sept.cluster.runtime import ray_session
    from sept.cluster.select import SelectConfig, select
    from sept.data import selection_files as files
    from sept.data.targets import load_target
    from sept.index.embedding_store import EmbeddingStore
    from sept.index.spec import IndexSpec
    from sept.training.bootstrap import bootstrap
    from sept.training.encoder import load_encoder

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.time()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.time()
        seconds[name] = round(now - clock, 1)
        clock = now
        log.info("%s done in %.0fs", name, seconds[name])

    corpus = make_icon_corpus(os.path.join(workdir, "icons"))
    ids, keys, images = load_pool(corpus.pool_spec)
    task = load_target(corpus.target_dir)
    queries = task.load_images("train")
    query_labels = np.asarray(task.labels("train"))
    budget = int(round(budget_fraction * len(keys)))
    lap("corpus")

    # --- sept's pipeline, stage by stage, with its defaults ---------------------------------
    encoder_path = os.path.join(workdir, "encoder.pt")
    if not os.path.exists(encoder_path):
        bootstrap(corpus.pool_spec, encoder_path, seed=seed, target=corpus.target_dir, steps=bootstrap_steps)
    lap("bootstrap")
    emb_path = os.path.join(workdir, "embeddings.zarr")
    index_path = os.path.join(workdir, "index.zarr")
    selection_dir = os.path.join(workdir, "selection")
    with ray_session(ray_address):
        embed_pool(EmbedConfig(pool=corpus.pool_spec, encoder=encoder_path, out=emb_path, ray_address=ray_address))
        lap("embed")
        build_index(IndexConfig(embeddings=emb_path, out=index_path, spec=IndexSpec(seed=seed), ray_address=ray_address))
        lap("index")
        select(SelectConfig(index=index_path, encoder=encoder_path, target=corpus.target_dir, budget=budget,
                            out=selection_dir, task="icons", ray_address=ray_address))
        lap("select")
    manifest = files.read_jsonl(os.path.join(files.task_dir(selection_dir, "icons"), files.MANIFEST))
    selected_keys = [row["key"] for row in manifest]
    rows: list[dict] = [dict(name="sept (bootstrap, embed, index, select)", precision=precision(
        selected_keys, corpus.truth, corpus.relevant), selected=len(selected_keys), kind="sept")]

    # --- baselines: same round robin, exact search, features in memory ----------------------
    def score(xb, xq) -> float:
        selection = round_robin(xq, xb, budget)
        return precision([keys[i] for i in selection.ids], corpus.truth, corpus.relevant)

    rows.append(dict(name="colour histogram (8x8x8 RGB)", precision=score(colour_histogram(images),
                                                                          colour_histogram(queries)), kind="baseline"))
    random_scores = [score(*_random_resnet18(images, queries, s, 64, workdir)) for s in range(random_seeds)]
    rows.append(dict(name=f"random-init ResNet-18, 64 px ({random_seeds} seeds: mean)",
                     precision=float(np.mean(random_scores)), low=min(random_scores), high=max(random_scores),
                     kind="baseline"))
    rows.append(dict(name="grayscale 16x16 thumbnail", precision=score(grey_thumbnail(images), grey_thumbnail(queries)),
                     kind="extra baseline"))
    rows.append(dict(name="pool base rate (random selection)", precision=corpus.base_rate(), kind="baseline"))
    lap("baselines")

    # --- selection refinements on sept's own embeddings ---------------------------------------
    store = EmbeddingStore.open(emb_path)
    xb_all, id_all = store.read_all()
    row_of = {int(i): r for r, i in enumerate(id_all.tolist())}
    order = np.asarray([row_of[int(i)] for i in ids])  # pool rows in load_pool's order
    xb = xb_all[order]
    encoder = load_encoder(encoder_path, device="cpu")
    xq = encoder.embed_images(queries)
    refinements = []
    for name, selection in refinement_selections(xq, query_labels, xb, budget, seed=seed).items():
        refinements.append(dict(name=name, precision=precision([keys[i] for i in selection.ids], corpus.truth,
                                                               corpus.relevant)))
    lap("refinements")

    best_trivial = max(r.get("high", r["precision"]) for r in rows if r["kind"] == "baseline"
                       and not r["name"].startswith("pool base rate"))
    result = dict(pool=len(keys), budget=budget, queries=len(queries), base_rate=corpus.base_rate(), rows=rows,
                  refinements=refinements, best_trivial=best_trivial, goal=GOAL_FACTOR * best_trivial,
                  met=rows[0]["precision"] >= GOAL_FACTOR * best_trivial, seconds=seconds,
                  total_seconds=round(sum(seconds.values()), 1),
                  encoder=dict(path=encoder_path, extra={k: v for k, v in encoder.extra.items() if k != "data"}))
    text = format_table(result)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return result


def format_table(result: dict) -> str:
    lines = [
        f"Pool {result['pool']} Oxygen icons, target {result['queries']} Tango devices/places train images, "
        f"budget {result['budget']} (10%). Precision = share of the selection in devices or places.",
        "",
        "| features | selection precision | x base rate |",
        "|---|---|---|",
    ]
    for r in result["rows"]:
        spread = f" (seeds {r['low']:.3f}-{r['high']:.3f})" if "low" in r else ""
        lines.append(f"| {r['name']} | {r['precision']:.3f}{spread} | {r['precision'] / result['base_rate']:.1f} |")
    lines += [
        "",
        f"Goal: sept >= {GOAL_FACTOR:g} x the best trivial baseline (colour histogram, random ResNet-18 best seed)"
        f" = {result['goal']:.3f}: {'met' if result['met'] else 'NOT met'}.",
        "",
        "Selection refinements on sept's embeddings (exact search, same budget):",
        "",
        "| selection | precision |",
        "|---|---|",
    ]
    lines += [f"| {r['name']} | {r['precision']:.3f} |" for r in result["refinements"]]
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items())
              + f"; total {result['total_seconds']:.0f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="work/retrieval_quality")
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--bootstrap-steps", type=int, default=None,
                        help="override sept's default schedule (for a quick smoke run only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(args.workdir, budget_fraction=args.budget_fraction, seed=args.seed, random_seeds=args.random_seeds,
        ray_address=args.ray_address, bootstrap_steps=args.bootstrap_steps)


if __name__ == "__main__":
    main()
