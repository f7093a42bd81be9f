"""sept report: contact sheets, histogram, per-class chart and counts on one HTML page that loads, with
all its images, in headless Chromium; precision per class computed from the truth."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sept.data.demo_corpus import make_demo_corpus
from sept.data.report import ReportConfig, write_report
from sept.data.samples import iter_samples
from sept.data.selection_folder import write_json, write_jsonl
from sept.data.selection_writer import SelectionShardWriter
from sept.errors import SeptError

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def selection(tmp_path_factory):
    """A small selection folder as `sept select` lays it out: one shared shard, a task's files."""
    root = tmp_path_factory.mktemp("report")
    corpus = make_demo_corpus(
        str(root / "corpus"), pool_size=60, shards=2, target_train_per_class=1, target_val_per_class=1, seed=3
    )
    sel = root / "sel"
    samples = [
        s for shard in sorted(os.listdir(corpus.pool_dir)) for s in iter_samples(os.path.join(corpus.pool_dir, shard))
    ][:24]
    with SelectionShardWriter(str(sel / "shards"), prefix="part-00000-test") as writer:
        shard_of = {s.key: writer.write(s) for s in samples}
    sizes = {}
    for name in set(shard_of.values()):
        data = (sel / "shards" / name).read_bytes()
        sizes[name] = dict(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    train = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(corpus.target_dir, "train")) for f in fs)
    rng = np.random.default_rng(0)
    rows, queries = [], []
    for q, ref in enumerate(train):
        cls = os.path.basename(os.path.dirname(ref))
        mine = samples[2 * q : 2 * q + 2]
        scores = sorted(rng.uniform(0.8, 0.99, size=len(mine)).round(4).tolist(), reverse=True)
        queries.append(
            dict(
                image=os.path.relpath(ref, corpus.target_dir),
                ref=ref,
                cls=cls,
                neighbours=[[1000 + 2 * q + j, s] for j, s in enumerate(scores)],
            )
        )
        for j, (sample, score) in enumerate(zip(mine, scores)):
            rows.append(
                dict(
                    id=1000 + 2 * q + j,
                    key=sample.key,
                    shard=shard_of[sample.key],
                    score=score,
                    cls=cls,
                    chosen_by=queries[-1]["image"],
                    retrieved_by=[queries[-1]["image"]],
                )
            )
    task = sel / "tasks" / "digits"
    per_class = {c: dict(images=1, share=2.0, selected=sum(r["cls"] == c for r in rows)) for c in map(str, range(10))}
    write_json(
        str(task / "task.json"),
        dict(
            config=dict(
                target=corpus.target_dir,
                budget=20,
                strategy="instance",
                balance="instance",
                min_similarity=None,
                leakage_threshold=0.97,
            ),
            summary=dict(
                per_class=per_class,
                duplicates=dict(retrieved_by_several=0, near_dup_threshold=None, near_duplicates_dropped=0),
                leakage=dict(enabled=True, threshold=0.97, heldout_images=10, pool_matches=1, skipped=1),
            ),
        ),
    )
    write_jsonl(str(task / "manifest.jsonl"), rows)
    write_json(str(task / "shards.json"), sizes)
    write_jsonl(str(task / "queries.jsonl"), queries)
    write_jsonl(
        str(task / "leakage.jsonl"),
        [dict(id=7, source_index=0, position=7, heldout="val/3/0000.png", similarity=0.985)],
    )
    return dict(sel=str(sel), corpus=corpus, rows=rows)


def test_report_numbers_and_files(selection, tmp_path):
    out = str(tmp_path / "report")
    result = write_report(
        ReportConfig(
            selection=selection["sel"], out=out, truth=selection["corpus"].truth_path, domain="digits", samples=4, top=3
        )
    )
    nums = result["tasks"]["digits"]
    truth = selection["corpus"].truth()
    rows = selection["rows"]
    assert nums["precision"]["overall"] == pytest.approx(np.mean([truth[r["key"]] == "digits" for r in rows]))
    for cls in {r["cls"] for r in rows}:
        mine = [truth[r["key"]] == "digits" for r in rows if r["cls"] == cls]
        assert nums["precision"]["per_class"][cls] == pytest.approx(np.mean(mine))
    assert nums["precision"]["base_rate"] == pytest.approx(np.mean([d == "digits" for d in truth.values()]))
    for name in nums["files"].values():
        with Image.open(os.path.join(out, name)) as im:
            assert im.width > 200 and im.height > 100
    with Image.open(os.path.join(out, nums["files"]["contacts"])) as sheet:  # 4 target images, 4 rows of tiles
        assert sheet.height == 6 + 4 * (72 + 14 + 6)
    page = Path(os.path.join(out, "index.html")).read_text()
    assert "leakage threshold" in page and "0.970" in page and "retrieved by several" in page
    with pytest.raises(SeptError, match="--truth and --domain"):
        write_report(ReportConfig(selection=selection["sel"], out=out, truth=selection["corpus"].truth_path))


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_page_loads_in_headless_chromium_with_every_image(selection, tmp_path):
    out = tmp_path / "report"
    write_report(ReportConfig(selection=selection["sel"], out=str(out), samples=4, top=3))
    url = (out / "index.html").as_uri()
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = len(re.findall(r"<img ", dom.stdout))
    assert images == 3
    assert f'data-images-loaded="{images}"' in dom.stdout and 'data-images-broken="0"' in dom.stdout
    shot = tmp_path / "page.png"
    subprocess.run(
        [_chromium(), *flags, "--window-size=1200,1600", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(shot) as im:
        assert im.size == (1200, 1600)
        colours = np.asarray(im.convert("RGB").resize((120, 160))).reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 50, "the screenshot shows a rendered page, not a blank one"
