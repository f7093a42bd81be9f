"""Dedup quality on real images: does ``sept dedup`` find planted copies, and how does pHash do? (issue 20)

    .venv/bin/python benchmarks/efficientnet_lite_import.py --workdir work/efficientnet_lite --variants 1
    .venv/bin/python benchmarks/dedup_quality.py --workdir work/dedup_quality \\
        --encoder work/efficientnet_lite/efficientnet_lite1.pt

Pool of originals (real images bundled on this machine, each distinct file once, identical pixels
once): every Adwaita icon name at its largest PNG (full-colour icons and symbolic glyphs,
composited on white; names whose 32x32 grey thumbnails match to 0.3% are one
picture, kept once), scikit-image's bundled photographs and its LFW subset (200 25x25 faces and
non-faces), scikit-learn's two sample photographs. (The Oxygen theme of ``icon_corpus.py`` is
not installed here, and the benchmark installs nothing.)

Planted: ``--per-family`` originals per transform family (disjoint draws), one copy each, in
extra WebDataset shards after the originals:

- ``jpeg``: re-encoded JPEG, quality uniform in 30..90;
- ``resize``: scaled by a factor log-uniform in 0.5..2 (Lanczos);
- ``crop``: centre crop of 80-95% of each side;
- ``flip``: horizontal mirror;
- ``overlay``: a text label on a coloured box in a corner, 2-5% of the area;
- ``exact``: the original's bytes again.

sept's real stages then run: ``embed_pool`` (Ray, local) with the given encoder, and ``dedup``
(``DedupConfig``) at the chosen default threshold, and at ``--also`` thresholds. The threshold
sweep reuses ``sept.index.pool_dedup`` (the same exact rule, k-means and near rule, with the
settings ``dedup`` derives) on the store's vectors, so each threshold costs no Ray round; the real
runs must remove exactly what the sweep says at their threshold (checked).

Scores, per threshold: a planted pair is found when the copy and its original end in one group
(one removed with the other as representative, or both standing for the same kept sample);
recall is per family and over all pairs. Precision is over every removed sample: a removal is
correct when it and its representative are a planted pair; any other (two distinct pool images
judged copies) is a false positive. The default is the threshold of highest recall at precision
>= 0.99. The baseline, measured in the same run: imagehash's pHash (64 bits) with the same
greedy rule (pool order, a sample within Hamming distance d of a kept one is removed in favour of
the nearest), over all pool pairs, d swept, scored identically. Results go to WORKDIR/results.md
and results.json.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger("dedup_quality")

FAMILIES = ("jpeg", "resize", "crop", "flip", "overlay", "exact")
ADWAITA = "/usr/share/icons/Adwaita"
SKIMAGE_PHOTOS = (  # bundled with scikit-image; motorcycle_right (a stereo twin of _left) left out
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png",
    "logo.png", "microaneurysms.png", "moon.png", "motorcycle_left.png", "page.png", "phantom.png",
    "retina.jpg", "rocket.jpg", "text.png",
)  # fmt: skip
MAX_SIDE = 512  # photographs are shrunk to this before planting, to keep embedding quick
PER_SHARD = 500
SAME_PICTURE = 0.003  # mean absolute difference of 32x32 grey thumbnails under which two originals are one picture
PRECISION_GOAL = 0.99
RECALL_GOAL = 0.95
THRESHOLDS = tuple(round(t, 3) for t in np.r_[np.arange(0.70, 0.95, 0.01), np.arange(0.95, 1.0, 0.005)])
PHASH_DISTANCES = tuple(range(0, 21))


# ---- the pool ------------------------------------------------------------------------------------


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def _shrunk(img: Image.Image) -> Image.Image:
    scale = MAX_SIDE / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    return img


def originals() -> list[tuple[str, str, Image.Image]]:
    """(source, name, RGB image) of every distinct real image here, in a fixed order."""
    import skimage.data
    import sklearn.datasets

    out = []
    largest: dict[str, tuple[int, str]] = {}
    for path in sorted(glob.glob(os.path.join(ADWAITA, "*x*", "*", "*.png"))):
        size = int(path.split(os.sep)[-3].split("x")[0])
        name = os.path.basename(path)
        if size > largest.get(name, (0, ""))[0]:
            largest[name] = (size, path)
    for name, (_, path) in sorted(largest.items()):
        with Image.open(path) as im:
            out.append(("symbolic" if "symbolic" in name else "icon", name, _rgb(im)))
    data_dir = os.path.dirname(skimage.data.__file__)
    for name in SKIMAGE_PHOTOS:
        with Image.open(os.path.join(data_dir, name)) as im:
            out.append(("photo", name, _shrunk(_rgb(im))))
    for i, arr in enumerate(sklearn.datasets.load_sample_images().images):
        out.append(("photo", f"sklearn-{i}", _shrunk(Image.fromarray(arr))))
    for i, arr in enumerate(skimage.data.lfw_subset()):
        out.append(("lfw", f"lfw-{i:03d}", Image.fromarray((arr * 255).round().astype(np.uint8)).convert("RGB")))
    seen, distinct = set(), []
    for source, name, img in out:
        digest = hashlib.sha256(repr(img.size).encode() + img.tobytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            distinct.append((source, name, img))
    # Icon themes ship one picture under several names and sizes (folder.png, inode-directory.png):
    # those are copies before anything is planted, so one of each stays.
    thumbs = np.stack(
        [np.asarray(im.convert("L").resize((32, 32), Image.BILINEAR), np.float32) / 255 for *_, im in distinct]
    )
    thumbs = thumbs.reshape(len(thumbs), -1)
    keep = np.ones(len(distinct), bool)
    for i in range(len(distinct)):
        if keep[i]:
            same = np.abs(thumbs[i + 1 :] - thumbs[i]).mean(axis=1) < SAME_PICTURE
            keep[i + 1 :][same] = False
    return [d for d, k in zip(distinct, keep) if k]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A text label on a coloured box in a random corner, covering 2-5% of the image."""
    out = img.copy()
    area = rng.uniform(0.02, 0.05) * img.width * img.height
    h = max(2, round(math.sqrt(area / 3)))
    w = max(2, min(img.width, round(area / h)))
    x = 0 if rng.random() < 0.5 else img.width - w
    y = 0 if rng.random() < 0.5 else img.height - h
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    draw = ImageDraw.Draw(out)
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour)
    ink = (255, 255, 255) if sum(colour) < 384 else (0, 0, 0)
    draw.text((x + 1, y), "(c) sept", fill=ink, font_size=max(4, h - 2))
    return out


def planted_copy(family: str, img: Image.Image, data: bytes, rng: np.random.Generator) -> tuple[bytes, str, str]:
    """(image bytes, extension, what was done) of one planted copy."""
    if family == "exact":
        return data, "png", "same bytes"
    if family == "jpeg":
        q = int(rng.integers(30, 91))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=q)
        return buf.getvalue(), "jpg", f"quality {q}"
    if family == "resize":
        s = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        size = (max(8, round(img.width * s)), max(8, round(img.height * s)))
        return _png(img.resize(size, Image.LANCZOS)), "png", f"x{s:.2f}"
    if family == "crop":
        f = float(rng.uniform(0.80, 0.95))
        w, h = max(1, round(img.width * f)), max(1, round(img.height * f))
        left, top = (img.width - w) // 2, (img.height - h) // 2
        return _png(img.crop((left, top, left + w, top + h))), "png", f"{f:.0%} of each side"
    if family == "flip":
        return _png(img.transpose(Image.FLIP_LEFT_RIGHT)), "png", "mirrored"
    if family == "overlay":
        return _png(_overlay(img, rng)), "png", "text box"
    raise ValueError(family)


@dataclass
class Pool:
    spec: str
    ids: np.ndarray  # (n,) every pool sample's sept id, in pool order
    meta: list[dict]  # per pool sample: source, name, family ("" for an original), pair (-1 for none)
    pairs: np.ndarray  # (p, 2) sept ids (original, copy)
    pair_family: list[str]


def make_pool(workdir: str, per_family: int, seed: int) -> Pool:
    import webdataset as wds

    from sept.data.identity import make_ids

    images = originals()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(images), size=per_family * len(FAMILIES), replace=False)
    samples = []  # (bytes, ext, meta)
    for source, name, img in images:
        samples.append((_png(img), "png", dict(source=source, name=name, family="", pair=-1)))
    for p, index in enumerate(chosen):
        family = FAMILIES[p // per_family]
        source, name, img = images[index]
        data, ext, how = planted_copy(family, img, samples[index][0], rng)
        samples[index][2]["pair"] = p
        samples.append((data, ext, dict(source=source, name=name, family=family, pair=p, how=how, of=int(index))))
    pool_dir = os.path.join(workdir, "pool")
    os.makedirs(pool_dir, exist_ok=True)
    ids = []
    for shard in range(-(-len(samples) // PER_SHARD)):
        with wds.TarWriter(os.path.join(pool_dir, f"{shard:05d}.tar")) as writer:
            part = samples[shard * PER_SHARD : (shard + 1) * PER_SHARD]
            for i, (data, ext, meta) in enumerate(part):
                key = f"{shard:05d}{i:04d}"
                writer.write({"__key__": key, ext: data, "json": json.dumps({"key": key, **meta}).encode()})
            ids.append(make_ids(shard, np.arange(len(part))))
    ids = np.concatenate(ids)
    meta = [m for _, _, m in samples]
    n_orig = len(images)
    pairs = np.asarray([(ids[m["of"]], ids[n_orig + p]) for p, m in enumerate(meta[n_orig:])], np.int64)
    families = [m["family"] for m in meta[n_orig:]]
    counts = {s: sum(m["source"] == s for m in meta[:n_orig]) for s in ("icon", "symbolic", "photo", "lfw")}
    log.info("pool: %d originals %s, %d planted copies", n_orig, counts, len(pairs))
    return Pool(pool_dir, ids, meta, pairs, families)


# ---- scoring -------------------------------------------------------------------------------------


def score(removed: np.ndarray, kept: np.ndarray, pool: Pool) -> dict:
    """Recall per family and overall, and precision over all removals, of a (removed, kept) table."""
    rep = dict(zip(removed.tolist(), kept.tolist()))
    pair_of = {}
    for p, (a, b) in enumerate(pool.pairs.tolist()):
        pair_of[a] = pair_of[b] = p

    def root(i: int) -> int:
        return rep.get(i, i)

    found = np.asarray([root(a) == root(b) for a, b in pool.pairs.tolist()])
    correct = np.asarray([pair_of.get(r, -1) == pair_of.get(k, -2) for r, k in zip(removed.tolist(), kept.tolist())])
    fams = np.asarray(pool.pair_family)
    index = {int(i): n for n, i in enumerate(pool.ids)}
    by_sources: dict[str, int] = {}
    for r, k in zip(removed[~correct].tolist(), kept[~correct].tolist()):
        pair = "-".join(sorted((pool.meta[index[r]]["source"], pool.meta[index[k]]["source"])))
        by_sources[pair] = by_sources.get(pair, 0) + 1
    out = dict(
        removed=len(removed),
        false_positives=int((~correct).sum()),
        precision=float(correct.mean()) if len(removed) else 1.0,
        recall=float(found.mean()),
        recall_by_family={f: float(found[fams == f].mean()) for f in FAMILIES},
        false_positives_by_sources=dict(sorted(by_sources.items(), key=lambda kv: -kv[1])),
    )
    return out


def false_positive_examples(removed, kept, sims, pool: Pool, limit: int = 8) -> list[str]:
    index = {int(i): n for n, i in enumerate(pool.ids)}
    pair_of = {}
    for p, (a, b) in enumerate(pool.pairs.tolist()):
        pair_of[a] = pair_of[b] = p
    rows = []
    for r, k, s in zip(removed.tolist(), kept.tolist(), sims.tolist()):
        if pair_of.get(r, -1) != pair_of.get(k, -2):
            a, b = pool.meta[index[r]], pool.meta[index[k]]
            rows.append(
                (
                    s,
                    f"{a['name']}{'~' + a['family'] if a['family'] else ''} -> {b['name']}{'~' + b['family'] if b['family'] else ''} ({s:.3f})",
                )
            )
    return [text for _, text in sorted(rows, reverse=True)[:limit]]


def best(rows: list[dict], key: str) -> dict:
    """The row of highest recall at precision >= the goal (ties: the stricter setting)."""
    ok = [r for r in rows if r["precision"] >= PRECISION_GOAL]
    if not ok:
        return max(rows, key=lambda r: r["precision"])
    top = max(r["recall"] for r in ok)
    tied = [r for r in ok if r["recall"] == top]
    return max(tied, key=lambda r: r[key]) if key == "threshold" else min(tied, key=lambda r: r[key])


# ---- sept's rules, swept ---------------------------------------------------------------------------


def sept_sweep(emb_path: str, pool: Pool, thresholds, *, cluster_size: int, seed: int) -> tuple[list[dict], dict]:
    """Every threshold through sept.index.pool_dedup with the settings sept dedup derives."""
    from sept.index.embedding_store import EmbeddingStore
    from sept.index.pool_dedup import assign, exact_copies, near_copies, train_centroids

    emb = EmbeddingStore.open(emb_path)
    xs, idss, hashes = [], [], []
    for i in emb.complete_shards():
        x, ids = emb.read_shard(i)
        xs.append(x)
        idss.append(ids)
        hashes.append(emb.read_hashes(i))
    x, ids, h = np.concatenate(xs), np.concatenate(idss), np.concatenate(hashes)
    n = len(ids)
    n_clusters = max(1, math.ceil(n / cluster_size))
    centroids = train_centroids(emb.sample(min(n, 64 * n_clusters), seed=seed), n_clusters, seed=seed, gpu=False)
    cluster, csim = assign(x, centroids)
    ex_removed, ex_kept = exact_copies(ids, h)
    keep = ~np.isin(ids, ex_removed)
    x16 = x.astype(np.float16).astype(np.float32)  # the map round hands the near round float16 vectors
    rows, tables = [], {}
    for t in thresholds:
        for label, cl in (("clusters", cluster), ("one cluster", np.zeros_like(cluster))):
            nr, nk, ns = near_copies(ids[keep], x16[keep], cl[keep], csim[keep], t)
            removed, kept, sims = _join(ex_removed, ex_kept, nr, nk, ns)
            row = dict(threshold=float(t), grouping=label, **score(removed, kept, pool))
            rows.append(row)
            if label == "clusters":
                tables[float(t)] = (removed, kept, sims)
    log.info("sweep: %d samples, %d clusters, %d exact copies", n, n_clusters, len(ex_removed))
    return rows, tables


def _join(ex_removed, ex_kept, nr, nk, ns):
    """Exact and near removals as one table whose representatives survive (``sept dedup``'s rule)."""
    near_of = dict(zip(nr.tolist(), nk.tolist()))
    kept = np.asarray([near_of.get(k, k) for k in ex_kept.tolist()], np.int64)
    removed = np.r_[ex_removed, nr].astype(np.int64)
    sims = np.r_[np.ones(len(ex_removed), np.float32), ns]
    return removed, np.r_[kept, nk].astype(np.int64), sims


# ---- the pHash baseline ------------------------------------------------------------------------------


def phash_bits(pool: Pool) -> np.ndarray:
    """(n, 64) bool pHash of every pool sample, read back from the shards as sept reads them."""
    import imagehash
    import webdataset as wds

    bits = []
    for path in sorted(glob.glob(os.path.join(pool.spec, "*.tar"))):
        for sample in wds.WebDataset(path, shardshuffle=False):
            data = next(sample[k] for k in ("jpg", "png") if k in sample)
            with Image.open(io.BytesIO(data)) as im:
                bits.append(imagehash.phash(im.convert("RGB")).hash.ravel())
    return np.asarray(bits, bool)


def phash_sweep(bits: np.ndarray, pool: Pool, distances) -> list[dict]:
    packed = np.packbits(bits, axis=1)
    x = np.unpackbits(packed, axis=1).astype(np.int16)
    D = x.shape[1] - (x @ x.T + (1 - x) @ (1 - x).T)  # Hamming distances, all pairs
    rows = []
    for d in distances:
        is_kept = np.ones(len(x), bool)
        removed, kept = [], []
        for i in range(len(x)):  # pool order: the same greedy rule as sept's near round
            cand = np.flatnonzero((D[i, :i] <= d) & is_kept[:i])
            if len(cand):
                j = cand[np.argmin(D[i, cand])]
                is_kept[i] = False
                removed.append(pool.ids[i])
                kept.append(pool.ids[j])
        rows.append(dict(distance=int(d), **score(np.asarray(removed, np.int64), np.asarray(kept, np.int64), pool)))
    return rows


# ---- the run -----------------------------------------------------------------------------------------


def real_dedup(emb_path: str, threshold: float) -> tuple[np.ndarray, np.ndarray, dict, float]:
    from sept.cluster.dedup import DedupConfig, dedup
    from sept.index.dedup_table import DedupTable

    t0 = time.perf_counter()
    summary = dedup(DedupConfig(embeddings=emb_path, threshold=threshold))
    seconds = time.perf_counter() - t0
    table = DedupTable.read(emb_path)
    return table.removed, table.kept, summary, seconds


def centred_encoder(encoder_path: str, emb_path: str, out: str) -> str:
    """The encoder with a ``center``: the mean normalised feature of the pool's vectors, which
    ``EncoderBundle.embed`` subtracts (what ``sept bootstrap`` stores; an import stores none)."""
    from sept.index.embedding_store import EmbeddingStore
    from sept.training.encoder import load_encoder, save_encoder

    x, _ = EmbeddingStore.open(emb_path).read_all()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    b = load_encoder(encoder_path, device="cpu")
    return save_encoder(
        out,
        b.model,
        arch=b.arch,
        image_size=b.image_size,
        mean=b.mean,
        std=b.std,
        extra={**b.extra, "center_of": len(x)},
        center=x.mean(axis=0),
        resize_size=b.resize_size,
        interpolation=b.interpolation,
        pool=b.pool,
        arch_config=b.arch_config,
        dim=b.dim,
    )


def evaluate(label: str, encoder: str, emb_path: str, pool: Pool, also: list[float]) -> dict:
    """embed, the sweep, the chosen threshold and ``--also`` run for real by ``sept dedup``."""
    from sept.cluster.dedup import DedupConfig
    from sept.cluster.embed import EmbedConfig, embed_pool

    t0 = time.perf_counter()
    embed_pool(EmbedConfig(pool=pool.spec, encoder=encoder, out=emb_path, batch_size=64))
    embed_s = time.perf_counter() - t0
    cfg = DedupConfig(embeddings=emb_path)
    rows, tables = sept_sweep(emb_path, pool, THRESHOLDS, cluster_size=cfg.cluster_size, seed=cfg.seed)
    chosen = best([r for r in rows if r["grouping"] == "clusters"], "threshold")
    runs = {}
    for t in sorted({chosen["threshold"], *also}):
        removed, kept, summary, seconds = real_dedup(emb_path, t)
        swept = tables.get(float(t))
        same = None if swept is None else bool(np.array_equal(np.sort(removed), np.sort(swept[0])))
        log.info(
            "%s: dedup at %g removed %d; the sweep's row removes the same samples: %s", label, t, len(removed), same
        )
        runs[t] = dict(score=score(removed, kept, pool), summary=summary, seconds=seconds, matches_sweep=same)
    t_below = max([t for t in THRESHOLDS if t < chosen["threshold"]], default=None)
    examples = false_positive_examples(*tables[chosen["threshold"]], pool)
    if t_below is not None:
        examples += [f"(at {t_below:g}) {e}" for e in false_positive_examples(*tables[t_below], pool)]
    return dict(
        label=label, encoder=encoder, embed_s=embed_s, rows=rows, chosen=chosen, runs=runs, fp_examples=examples
    )


def _fmt_row(label: str, r: dict) -> str:
    fam = " | ".join(f"{r['recall_by_family'][f]:.3f}" for f in FAMILIES)
    fp = ", ".join(f"{k} {v}" for k, v in list(r["false_positives_by_sources"].items())[:3])
    return f"| {label} | {r['precision']:.4f} | {r['false_positives']} ({fp}) | {r['recall']:.3f} | {fam} |"


HEADER = "| method | precision | false pos. (top source pairs) | recall | " + " | ".join(FAMILIES) + " |"
RULE = "|---|---|---|---|" + "---|" * len(FAMILIES)


def report(pool: Pool, evals: list[dict], ph_rows: list[dict], ph_best: dict, times: str, per_family: int) -> str:
    lines = [
        f"pool: {len(pool.ids)} samples ({len(pool.ids) - len(pool.pairs)} originals, {len(pool.pairs)} planted, "
        f"{per_family} a family)",
        times,
        "",
        HEADER,
        RULE,
    ]
    for ev in evals:
        for t, r in ev["runs"].items():
            tag = " (its best at precision >= 0.99)" if t == ev["chosen"]["threshold"] else ""
            lines.append(_fmt_row(f"**sept dedup --threshold {t:g}**, {ev['label']}{tag}", r["score"]))
    lines.append(_fmt_row(f"pHash, Hamming <= {ph_best['distance']} (its best at precision >= 0.99)", ph_best))
    lines.append("")
    for ev in evals:
        head = ev["runs"][ev["chosen"]["threshold"]]["score"]
        ratio = head["recall"] / max(ph_best["recall"], 1e-9)
        crop = head["recall_by_family"]["crop"], ph_best["recall_by_family"]["crop"]
        met = head["recall"] >= RECALL_GOAL and head["precision"] >= PRECISION_GOAL
        lines.append(
            f"- {ev['label']}: best threshold {ev['chosen']['threshold']:g}; recall vs pHash {ratio:.2f}x "
            f"({head['recall']:.3f} vs {ph_best['recall']:.3f}), on crops {crop[0]:.3f} vs {crop[1]:.3f}; "
            f"goal (recall >= {RECALL_GOAL} at precision >= {PRECISION_GOAL}) {'met' if met else 'NOT met'}; "
            f"real runs match the sweep: {all(r['matches_sweep'] for r in ev['runs'].values())}"
        )
    for ev in evals:
        lines += [
            "",
            f"sept's sweep, {ev['label']} (`clusters`: the k-means sept dedup uses; `one cluster`: all pairs):",
            "",
            HEADER.replace("| method |", "| threshold, grouping |"),
            RULE,
        ]
        lines += [_fmt_row(f"{r['threshold']:g}, {r['grouping']}", r) for r in ev["rows"]]
        lines += ["", f"false positives, {ev['label']}, most similar first (removed -> representative, cosine):", ""]
        lines += [f"- {e}" for e in ev["fp_examples"]] or ["- none"]
    lines += ["", "pHash sweep:", "", HEADER.replace("| method |", "| Hamming <= |"), RULE]
    lines += [_fmt_row(str(r["distance"]), r) for r in ph_rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="work/dedup_quality")
    parser.add_argument("--encoder", required=True, help="sept encoder file (benchmarks/efficientnet_lite_import.py)")
    parser.add_argument("--per-family", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--also", type=float, nargs="*", default=[0.96], help="thresholds also run for real")
    parser.add_argument("--no-centred", action="store_true", help="skip the encoder centred on the pool")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from sept.cluster.runtime import ray_session

    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    pool = make_pool(workdir, args.per_family, args.seed)
    build_s = time.perf_counter() - t0
    raw_emb = os.path.join(workdir, "emb.zarr")
    with ray_session(None):
        evals = [evaluate("as imported", args.encoder, raw_emb, pool, args.also)]
        if not args.no_centred:
            centred = centred_encoder(args.encoder, raw_emb, os.path.join(workdir, "encoder-centred.pt"))
            evals.append(
                evaluate("centred on the pool", centred, os.path.join(workdir, "emb-centred.zarr"), pool, args.also)
            )
    t0 = time.perf_counter()
    ph_rows = phash_sweep(phash_bits(pool), pool, PHASH_DISTANCES)
    phash_s = time.perf_counter() - t0
    ph_best = best(ph_rows, "distance")
    times = (
        f"times: build {build_s:.0f} s, "
        + ", ".join(f"embed ({ev['label']}) {ev['embed_s']:.0f} s" for ev in evals)
        + f", pHash {phash_s:.0f} s; encoder {args.encoder}"
    )
    text = report(pool, evals, ph_rows, ph_best, times, args.per_family)
    print(text)
    for ev in evals:
        print(f"best threshold ({ev['label']}): {ev['chosen']['threshold']:g}")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(dict(evals=evals, phash=ph_rows, phash_best=ph_best), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
