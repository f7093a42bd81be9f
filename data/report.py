"""sept report: a page a person can look at to judge a selection.

For every task of a selection folder it writes, under the report folder:

* ``TASK-contacts.png``: a contact sheet: for a sample of target images, the image itself and its
  best chosen pool images, each with its similarity;
* ``TASK-scores.png``: the histogram of the selected samples' similarities, with the similarity
  floor and the leakage threshold marked;
* ``TASK-classes.png``: per class, the share of the budget it was due and what it got;
* ``index.html``: all of it, with the counts: budget, duplicates (samples retrieved by several
  target images, near-duplicates dropped), leakage (threshold, held-out images, pool samples
  matched and skipped) and, given ``truth`` ({pool key: domain}) and ``domain``, the precision
  of the selection per class against the pool's base rate.

A curated task (``sept curate``: its config's strategy is ``curated``) has no target images;
it gets instead a contact sheet row per top-level cluster (the largest ones, their samples
closest to a centroid first) and ``TASK-clusters.png``: the top-level cluster sizes in the pool
(before balancing) against those in the curated sample (after).

Pool images are read from the selection's shared shards (each shard once); images that do not
decode are shown as a grey tile, never fatal. Every file is written under a temporary name and
renamed into place.
"""

from __future__ import annotations

import html
import io
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sept.data.decode import BadSample, decode_image
from sept.data.samples import image_bytes, iter_samples
from sept.data.selection_folder import (
    LEAKAGE_FILE,
    QUERIES_FILE,
    SHARDS_DIR,
    TASK_FILE,
    list_tasks,
    read_json,
    read_jsonl,
    read_manifest,
    task_dir,
)
from sept.errors import SeptError
from sept.io import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class ReportConfig:
    selection: str = field(metadata={"help": "selection directory from `sept select`"})
    out: str = field(metadata={"help": "report directory to write (index.html and PNGs)"})
    tasks: list[str] = field(
        default_factory=list, metadata={"flag": "--task", "help": "task to show (repeatable; default: all)"}
    )
    truth: str | None = field(default=None, metadata={"help": "JSON {pool key: domain}, to measure precision"})
    domain: str | list[str] | None = field(  # "DOMAIN" for every task, or "TASK=DOMAIN" entries
        default_factory=list,
        metadata={
            "help": "the domain of --truth that counts as relevant: DOMAIN for every task, or TASK=DOMAIN (repeatable)"
        },
    )
    samples: int = field(default=8, metadata={"help": "target images per contact sheet"})
    top: int = field(default=8, metadata={"help": "retrieved images shown per target image"})
    seed: int = field(default=0, metadata={"help": "which target images are sampled"})
    tile: int = 72  # pixels per image in the contact sheet


def write_report(cfg: ReportConfig) -> dict:
    """Write the report; returns what it wrote and the numbers it shows."""
    if not os.path.isdir(cfg.selection):
        raise SeptError(f"selection folder not found: {cfg.selection}")
    tasks = cfg.tasks or list_tasks(cfg.selection)
    if not tasks:
        raise SeptError(f"{cfg.selection} holds no selected task (no tasks/*/manifest.jsonl)")
    domains = _domains(cfg.domain, tasks)
    if (cfg.truth is None) != (not domains):
        raise SeptError("--truth and --domain go together: the truth file's domain that counts as relevant")
    truth = _read_truth(cfg.truth) if cfg.truth else None
    os.makedirs(cfg.out, exist_ok=True)
    sections, numbers = [], {}
    for task in tasks:
        section, nums = _task_report(cfg, task, truth, domains.get(task))
        sections.append(section)
        numbers[task] = nums
    page = _page(cfg, [_overview(cfg, tasks)] + sections)
    atomic_write_bytes(os.path.join(cfg.out, "index.html"), page.encode("utf-8"))
    log.info("report: %d task(s) written to %s", len(tasks), os.path.join(cfg.out, "index.html"))
    return dict(page=os.path.abspath(os.path.join(cfg.out, "index.html")), tasks=numbers)


def _domains(domain: str | list[str] | None, tasks: list[str]) -> dict[str, str]:
    """{task: relevant domain} from "DOMAIN" (every task) and "TASK=DOMAIN" entries."""
    entries = [domain] if isinstance(domain, str) else list(domain or [])
    default = [e for e in entries if "=" not in e]
    if len(default) > 1:
        raise SeptError(f"--domain given {len(default)} times without TASK=; name the task of each")
    out = {t: default[0] for t in tasks} if default else {}
    for entry in entries:
        if "=" in entry:
            task, _, dom = entry.partition("=")
            if task not in tasks:
                raise SeptError(f"--domain {entry}: no task {task!r} in the report (tasks: {', '.join(tasks)})")
            out[task] = dom
    return out


def _overview(cfg: ReportConfig, tasks: list[str]) -> str:
    """The shared shards: how many, how big, and how many samples the tasks share."""
    folder = os.path.join(cfg.selection, SHARDS_DIR)
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".tar")) if os.path.isdir(folder) else []
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in shards)
    ids: dict[int, int] = defaultdict(int)
    for task in tasks:
        for r in read_manifest(cfg.selection, task):
            ids[int(r["id"])] += 1
    rows = [
        ("tasks", ", ".join(tasks)),
        ("shared shards", len(shards)),
        ("bytes in shared shards", f"{size:,}"),
        ("distinct samples of these tasks", len(ids)),
        ("samples selected by more than one task", sum(1 for n in ids.values() if n > 1)),
    ]
    return "<section id=overview><h2>Shared shards</h2>" + _table(rows) + "</section>"


def _read_truth(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            truth = json.load(f)
    except (OSError, ValueError) as err:
        raise SeptError(f"cannot read truth file {path}: {err}") from None
    if not isinstance(truth, dict):
        raise SeptError(f"truth file {path} must map pool keys to domains")
    return truth


# ---- one task ------------------------------------------------------------------------------------


def _task_report(cfg: ReportConfig, task: str, truth: dict[str, str] | None, domain: str | None) -> tuple[str, dict]:
    folder = task_dir(cfg.selection, task)
    manifest = read_manifest(cfg.selection, task)
    meta = read_json(os.path.join(folder, TASK_FILE))
    summary, config = meta.get("summary") or {}, meta.get("config") or {}
    queries = (
        read_jsonl(os.path.join(folder, QUERIES_FILE)) if os.path.exists(os.path.join(folder, QUERIES_FILE)) else []
    )
    leaked = (
        read_jsonl(os.path.join(folder, LEAKAGE_FILE)) if os.path.exists(os.path.join(folder, LEAKAGE_FILE)) else []
    )
    if config.get("strategy") == CURATED:
        return _curated_report(cfg, task, manifest, config, summary, truth, domain)
    by_id = {int(r["id"]): r for r in manifest}
    scores = np.asarray([r["score"] for r in manifest], dtype=np.float64)

    files = {}
    files["contacts"] = _contact_sheet(cfg, task, queries, by_id)
    files["scores"] = _score_histogram(cfg, task, scores, config, leaked)
    files["classes"] = _class_chart(cfg, task, summary.get("per_class", {}))

    precision = _precision(manifest, truth, domain) if truth is not None and domain else None
    nums = dict(
        selected=len(manifest),
        budget=config.get("budget"),
        duplicates=summary.get("duplicates", {}),
        leakage=summary.get("leakage", {}),
        precision=precision,
        files=files,
    )
    return _section(task, config, summary, manifest, precision, files, len(leaked)), nums


# ---- a curated task (`sept curate`) ------------------------------------------------------------------

CURATED = "curated"  # the strategy a curated task's config names
CLUSTERS_SHOWN = 12  # the largest top-level clusters on the contact sheet


def _curated_report(
    cfg: ReportConfig, task: str, manifest: list[dict], config: dict, summary: dict, truth, domain
) -> tuple[str, dict]:
    """A curated task: a contact sheet row per large top-level cluster, and the cluster sizes before
    and after balancing (from ``clusters.npz``)."""
    with np.load(os.path.join(task_dir(cfg.selection, task), "clusters.npz")) as z:
        pool_sizes, sample_sizes = z["pool_sizes"], z["sample_sizes"]
    members: dict[str, list[dict]] = defaultdict(list)
    for r in manifest:
        members[r["cls"]].append(r)
    names = sorted(members, key=lambda c: (-len(members[c]), c))[:CLUSTERS_SHOWN]
    shown = {c: sorted(members[c], key=lambda r: (-r["score"], r["id"]))[: cfg.top] for c in names}
    pool = _pool_images(cfg, [r for rows in shown.values() for r in rows])
    index_of = {c: int(c[1:]) for c in names}
    lines = [
        SheetRow(
            f"cluster {c}",
            f"{sample_sizes[index_of[c]]} of {pool_sizes[index_of[c]]}",
            [(pool.get(int(r["id"])), f"{r['score']:.3f}", (0, 0, 0), None) for r in shown[c]],
        )
        for c in names
    ]
    files = {}
    if lines:
        files["contacts"] = f"{task}-contacts.png"
        _save_png(_sheet(cfg, lines, cfg.top), os.path.join(cfg.out, files["contacts"]))
    files["clusters"] = _cluster_size_chart(cfg, task, pool_sizes, sample_sizes)
    precision = _precision(manifest, truth, domain) if truth is not None and domain else None
    sizes = summary.get("cluster_sizes", {})
    nums = dict(selected=len(manifest), size=config.get("size"), cluster_sizes=sizes, precision=precision, files=files)
    pool_info = summary.get("pool", {})
    facts = [
        ("strategy", "curated: balanced over hierarchical k-means clusters"),
        ("samples asked", config.get("size")),
        ("selected", len(manifest)),
        ("clusters per level, finest first", ", ".join(map(str, config.get("clusters", [])))),
        ("resampling steps", config.get("resampling_steps")),
        ("pool samples", pool_info.get("samples")),
        ("skipped as duplicates (dedup table)", pool_info.get("dedup_skipped")),
    ]
    for when in ("pool", "sample"):
        spread = sizes.get(when, {})
        facts.append((f"top-level cluster sizes in the {when}: min / max / entropy", _spread_text(spread)))
    rows = [(c, int(pool_sizes[index_of[c]]), len(members[c])) for c in names]
    parts = [f'<section id="task-{html.escape(task)}"><h2>Task {html.escape(task)}</h2>', _table(facts)]
    if precision:
        parts.append(
            f"<p class=precision>{html.escape(precision['domain'])} among the curated: "
            f"<b>{precision['overall']:.1%}</b>, pool base rate {precision['base_rate']:.1%}</p>"
        )
    if files.get("contacts"):
        parts.append(
            f"<h3>The {len(names)} largest top-level clusters, their samples closest to a centroid</h3>"
            f'<img src="{files["contacts"]}" alt="contact sheet of {html.escape(task)}">'
        )
    if files.get("clusters"):
        parts.append(
            f'<div class=charts><img src="{files["clusters"]}" alt="cluster sizes of {html.escape(task)}"></div>'
        )
    parts.append("<h3>Largest clusters</h3>" + _table(rows, ("cluster", "pool samples", "curated")))
    parts.append("</section>")
    return "\n".join(parts), nums


def _spread_text(spread: dict) -> str:
    if not spread:
        return ""
    entropy = spread.get("entropy")
    return f"{spread.get('min')} / {spread.get('max')} / " + ("" if entropy is None else f"{entropy:.3f}")


def _cluster_size_chart(cfg: ReportConfig, task: str, pool_sizes: np.ndarray, sample_sizes: np.ndarray) -> str | None:
    """Top-level cluster sizes, largest in the pool first: the pool's (before) against the sample's (after)."""
    if not len(pool_sizes):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-pool_sizes, kind="stable")
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(6, 3))
    if len(order) <= 100:
        ax.bar(x - 0.2, pool_sizes[order], width=0.4, color="#bbbbbb", label="pool (before balancing)")
        ax.bar(x + 0.2, sample_sizes[order], width=0.4, color="#3a6fc4", label="curated (after)")
    else:
        ax.step(x, pool_sizes[order], where="mid", color="#888888", label="pool (before balancing)")
        ax.step(x, sample_sizes[order], where="mid", color="#3a6fc4", label="curated (after)")
    ax.set_xlabel("top-level cluster, largest in the pool first")
    ax.set_ylabel("samples")
    ax.set_title(f"{task}: cluster sizes before and after balancing")
    ax.legend(fontsize=8)
    name = f"{task}-clusters.png"
    _figure_png(fig, os.path.join(cfg.out, name))
    return name


def _precision(manifest: list[dict], truth: dict[str, str], domain: str) -> dict:
    per_class: dict[str, list[bool]] = defaultdict(list)
    for r in manifest:
        per_class[r.get("cls", "?")].append(truth.get(r["key"]) == domain)
    hits = [h for v in per_class.values() for h in v]
    base = float(np.mean([d == domain for d in truth.values()])) if truth else 0.0
    return dict(
        domain=domain,
        overall=float(np.mean(hits)) if hits else 0.0,
        base_rate=base,
        per_class={c: float(np.mean(v)) for c, v in sorted(per_class.items())},
        unknown=sum(1 for r in manifest if r["key"] not in truth),
    )


def _pool_images(cfg: ReportConfig, rows: list[dict]) -> dict[int, Image.Image | None]:
    """Decoded pool images of these manifest rows, reading each shared shard once."""
    wanted: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        wanted[r["shard"]][r["key"]].append(int(r["id"]))
    out: dict[int, Image.Image | None] = {}
    for shard, keys in sorted(wanted.items()):
        path = os.path.join(cfg.selection, SHARDS_DIR, shard)
        try:
            for sample in iter_samples(path):
                if sample.key in keys:
                    data = image_bytes(sample)
                    try:
                        image = decode_image(data) if data else None
                    except BadSample:
                        image = None
                    for pid in keys[sample.key]:
                        out[pid] = image
        except SeptError as err:  # a missing shard shows as grey tiles, and is logged
            log.warning("report: %s", err)
    return out


def _target_images(refs: list[str]) -> list[Image.Image | None]:
    from sept.data.targets import load_image_refs

    images = []
    for ref in refs:
        try:
            images.append(load_image_refs([ref])[0])
        except SeptError as err:
            log.warning("report: %s", err)
            images.append(None)
    return images


def _contact_sheet(cfg: ReportConfig, task: str, queries: list[dict], by_id: dict[int, dict]) -> str | None:
    shown = [q for q in queries if q["neighbours"]]
    if not shown:
        return None
    rng = np.random.default_rng(cfg.seed)
    pick = sorted(rng.choice(len(shown), size=min(cfg.samples, len(shown)), replace=False).tolist())
    rows = [shown[i] for i in pick]
    needed = [by_id[int(pid)] for q in rows for pid, _ in q["neighbours"][: cfg.top] if int(pid) in by_id]
    pool = _pool_images(cfg, needed)
    targets = _target_images([q["ref"] for q in rows])
    blue = (30, 90, 200)
    lines = [
        SheetRow(
            _ellipsis(q["image"], 22),
            f"class {_ellipsis(str(q['cls']), 16)}",
            [(target, "target", blue, blue)]
            + [(pool.get(int(pid)), f"{score:.3f}", (0, 0, 0), None) for pid, score in q["neighbours"][: cfg.top]],
        )
        for q, target in zip(rows, targets)
    ]
    name = f"{task}-contacts.png"
    _save_png(_sheet(cfg, lines, cfg.top + 1), os.path.join(cfg.out, name))
    return name


@dataclass
class SheetRow:
    """One row of a contact sheet: two lines of label, then tiles of (image, caption, caption colour, border)."""

    title: str
    subtitle: str
    tiles: list[tuple]


def _sheet(cfg: ReportConfig, rows: list[SheetRow], columns: int) -> Image.Image:
    t, pad, label_h, left = cfg.tile, 6, 14, 150
    width = left + columns * (t + pad) + pad
    height = pad + len(rows) * (t + label_h + pad)
    sheet = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, row in enumerate(rows):
        y = pad + i * (t + label_h + pad)
        draw.text((pad, y + 4), row.title, fill=(0, 0, 0), font=font)
        draw.text((pad, y + 20), row.subtitle, fill=(90, 90, 90), font=font)
        for j, (image, caption, colour, border) in enumerate(row.tiles[:columns]):
            x = left + j * (t + pad)
            _paste(sheet, image, x, y, t, border=border)
            draw.text((x, y + t + 1), caption, fill=colour, font=font)
    return sheet


def _paste(sheet: Image.Image, image: Image.Image | None, x: int, y: int, size: int, border=None) -> None:
    if image is None:
        tile = Image.new("RGB", (size, size), (190, 190, 190))
        ImageDraw.Draw(tile).text((size // 2 - 3, size // 2 - 6), "?", fill=(80, 80, 80))
    else:
        tile = image.convert("RGB")
        tile.thumbnail((size, size), Image.Resampling.NEAREST if max(tile.size) < size else Image.Resampling.LANCZOS)
        if tile.size != (size, size):  # small images are scaled up, keeping their pixels sharp
            scale = size / max(tile.size)
            tile = tile.resize(
                (max(1, round(tile.width * scale)), max(1, round(tile.height * scale))), Image.Resampling.NEAREST
            )
    sheet.paste(tile, (x + (size - tile.width) // 2, y + (size - tile.height) // 2))
    if border is not None:
        ImageDraw.Draw(sheet).rectangle([x - 2, y - 2, x + size + 1, y + size + 1], outline=border, width=2)


def _ellipsis(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3) :]


def _figure_png(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _score_histogram(cfg: ReportConfig, task: str, scores: np.ndarray, config: dict, leaked: list[dict]) -> str | None:
    if not len(scores):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(scores, bins=30, color="#3a6fc4", label=f"selected ({len(scores)})")
    if leaked:
        ax.hist(
            [r["similarity"] for r in leaked],
            bins=30,
            color="#d9534f",
            alpha=0.7,
            label=f"excluded as leakage ({len(leaked)})",
        )
    if config.get("min_similarity") is not None:
        ax.axvline(config["min_similarity"], color="black", linestyle="--", label="similarity floor")
    if config.get("leakage_threshold") is not None:
        ax.axvline(config["leakage_threshold"], color="#d9534f", linestyle=":", label="leakage threshold")
    ax.set_xlabel("cosine similarity to the target image that retrieved it (best)")
    ax.set_ylabel("pool samples")
    ax.set_title(f"{task}: similarity of the selected samples")
    ax.legend(fontsize=8)
    name = f"{task}-scores.png"
    _figure_png(fig, os.path.join(cfg.out, name))
    return name


def _class_chart(cfg: ReportConfig, task: str, per_class: dict) -> str | None:
    if not per_class:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_class)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names) + 2), 3))
    ax.bar(x - 0.2, [per_class[n]["share"] for n in names], width=0.4, color="#bbbbbb", label="share of the budget")
    ax.bar(x + 0.2, [per_class[n]["selected"] for n in names], width=0.4, color="#3a6fc4", label="selected")
    ax.set_xticks(
        x,
        [_ellipsis(n, 12) for n in names],
        rotation=45 if len(names) > 8 else 0,
        ha="right" if len(names) > 8 else "center",
    )
    ax.set_ylabel("pool samples")
    ax.set_title(f"{task}: budget use per class")
    ax.legend(fontsize=8)
    name = f"{task}-classes.png"
    _figure_png(fig, os.path.join(cfg.out, name))
    return name


# ---- HTML ------------------------------------------------------------------------------------------


def _table(rows: list[tuple], header: tuple | None = None) -> str:
    esc = lambda v: html.escape("" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))  # noqa: E731
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _section(
    task: str, config: dict, summary: dict, manifest: list[dict], precision: dict | None, files: dict, leaked: int
) -> str:
    dup = summary.get("duplicates", {})
    leak = summary.get("leakage", {})
    facts = [
        ("target", config.get("target")),
        ("budget", config.get("budget")),
        ("selected", len(manifest)),
        ("strategy", config.get("strategy")),
        ("balance", config.get("balance")),
        ("share of the budget to top scores", config.get("topk_share")),
        ("similarity floor", config.get("min_similarity")),
        ("retrieved by several target images (kept once)", dup.get("retrieved_by_several")),
        ("near-duplicate threshold", dup.get("near_dup_threshold")),
        ("near-duplicates dropped", dup.get("near_duplicates_dropped")),
        ("leakage guard", "on" if leak.get("enabled") else "off"),
        ("leakage threshold", leak.get("threshold")),
        ("held-out images checked", leak.get("heldout_images")),
        ("pool samples too close to a held-out image", leak.get("pool_matches", leaked)),
        ("of those, met while filling and skipped", leak.get("skipped")),
    ]
    per_class = summary.get("per_class", {})
    class_rows = []
    for name, c in per_class.items():
        p = precision["per_class"].get(name) if precision else None
        class_rows.append((name, c.get("images"), c.get("share"), c.get("selected"), p))
    header = ("class", "target images", "share of budget", "selected", "precision" if precision else "")
    parts = [f'<section id="task-{html.escape(task)}"><h2>Task {html.escape(task)}</h2>', _table(facts)]
    if precision:
        parts.append(
            f"<p class=precision>Precision ({html.escape(precision['domain'])} among selected): "
            f"<b>{precision['overall']:.1%}</b>, pool base rate {precision['base_rate']:.1%}"
            + (f"; {precision['unknown']} selected keys not in the truth file" if precision["unknown"] else "")
            + "</p>"
        )
    if files.get("contacts"):
        parts.append(
            f'<h3>Target images and their best chosen pool images</h3><img src="{files["contacts"]}" '
            f'alt="contact sheet of {html.escape(task)}">'
        )
    parts.append(
        "<div class=charts>"
        + "".join(
            f'<img src="{files[k]}" alt="{k} of {html.escape(task)}">' for k in ("scores", "classes") if files.get(k)
        )
        + "</div>"
    )
    parts.append("<h3>Per class</h3>" + _table(class_rows, header))
    parts.append("</section>")
    return "\n".join(parts)


_STYLE = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%;margin:0.5em 0}
.charts img{max-width:48%;margin-right:1%}section{margin-bottom:3em}"""

# Counts the page's images once it has loaded, so a headless browser can tell a page whose images
# all load from one with broken links.
_SCRIPT = """window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.setAttribute('data-images-loaded', imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length);
  document.body.setAttribute('data-images-broken', imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length);
});"""


def _page(cfg: ReportConfig, sections: list[str]) -> str:
    title = f"sept selection report: {os.path.abspath(cfg.selection)}"
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def _save_png(image: Image.Image, path: str) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
