"""Balance: the domain distribution of a curated subset against a random subset of the same size.

The demo corpus's pool (four domains in equal shares) is cut down to imbalanced shares, 70/20/7/3 %
by default (digits, shapes, textures, gradients), and embedded in this process with the tests'
edge encoder (an untrained ResNet with a fixed edge-filter stem: seconds, no bootstrap). For each
seed, the curation ``sept curate`` runs (its resolved defaults, its hierarchical k-means with
resampling and its balanced sampling, ``sept.cluster.curate``) draws ``--size`` samples, and a
uniform random subset of the same size is drawn beside it. Printed: per seed and on average, the
normalised entropy of the domain counts (1 = even) and the largest-to-smallest domain ratio, and
the curated-against-random ratio of each. ``--encoder`` embeds with another sept encoder instead,
e.g. a bootstrap's (``benchmarks/curate_pretrain.py`` leaves one in ``WORKDIR/experiment/encoder.pt``).

    .venv/bin/python benchmarks/curate_balance.py --pool-size 2400 --size 200 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from test_curate import _imbalanced_pool, entropy  # noqa: E402  (the test's imbalanced pool)
from test_select_tasks import make_edge_encoder  # noqa: E402  (the test's fast encoder)

from sept.cluster.curate import CurateConfig, _task_config  # noqa: E402
from sept.data.decode import decode_image  # noqa: E402
from sept.data.demo_corpus import DOMAINS, make_demo_corpus  # noqa: E402
from sept.data.samples import iter_samples  # noqa: E402
from sept.data.shards import list_shards  # noqa: E402
from sept.index import hierarchical_kmeans as hk  # noqa: E402
from sept.index.dedup import normalize  # noqa: E402


def _ratio(counts: np.ndarray) -> float:
    return float(counts.max() / max(1, counts.min()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool-size", type=int, default=2400, help="demo pool before the cut (a quarter per domain)")
    ap.add_argument("--size", type=int, default=200, help="samples curated (and drawn at random)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--clusters", default="", help="levels, finest first (default: curate's own)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--encoder", default=None, help="sept encoder to embed with (default: the tests' edge encoder)")
    args = ap.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="sept-curate-balance-")
    os.makedirs(root, exist_ok=True)
    corpus = make_demo_corpus(os.path.join(root, "corpus"), pool_size=args.pool_size, shards=2, seed=5)
    pool, truth = _imbalanced_pool(root, corpus)
    samples = [s for shard in list_shards(pool) for s in iter_samples(shard)]
    images = [decode_image(s.members["jpg"]) for s in samples]
    from sept.training.encoder import load_encoder

    started = time.time()
    path = args.encoder or make_edge_encoder(os.path.join(root, "enc.pt"), images[::2])
    encoder = load_encoder(path, device="cpu")
    x = normalize(encoder.embed_images(images))
    domain = np.asarray([DOMAINS.index(truth[s.key]) for s in samples])
    pool_counts = np.bincount(domain, minlength=len(DOMAINS))
    print(
        f"pool: {len(x)} samples, domains {dict(zip(DOMAINS, pool_counts.tolist()))}; embedded in {time.time() - started:.0f}s"
    )

    clusters = [int(v) for v in args.clusters.split(",") if v.strip()]
    header = "| seed | levels | curated domains | random domains | entropy curated / random | ratio curated / random |"
    print(header + "\n|" + "---|" * 6)
    totals = []
    for seed in args.seeds:
        settings = _task_config(
            CurateConfig(embeddings="", size=args.size, out="x", clusters=clusters, seed=seed), len(x), None
        )
        tree = hk.hierarchical_kmeans(
            x,
            settings["clusters"],
            steps=settings["resampling_steps"],
            sample_sizes=settings["sample_size"],
            seed=seed,
            niter=settings["niter"],
            progress=False,
        )
        D, I = hk.assign(x, tree.centroids[0])
        ours = np.bincount(domain[hk.balanced_sample(I, tree, args.size, distances=D, seed=seed)], minlength=4)
        rand = np.bincount(domain[np.random.default_rng(seed).choice(len(x), args.size, replace=False)], minlength=4)
        e, r = (entropy(ours), entropy(rand)), (_ratio(ours), _ratio(rand))
        totals.append(e + r)
        print(
            f"| {seed} | {','.join(map(str, settings['clusters']))} | {ours.tolist()} | {rand.tolist()} | "
            f"{e[0]:.3f} / {e[1]:.3f} | {r[0]:.1f} / {r[1]:.1f} |"
        )
    e_ours, e_rand, r_ours, r_rand = np.mean(totals, axis=0)
    print(
        f"mean: entropy {e_ours:.3f} curated vs {e_rand:.3f} random ({e_ours / e_rand:.2f}x); "
        f"largest/smallest domain {r_ours:.1f} vs {r_rand:.1f} ({r_rand / r_ours:.1f}x flatter); "
        f"pool's own entropy {entropy(pool_counts):.3f}"
    )


if __name__ == "__main__":
    main()
