"""The index sept would choose at 1M to 1B vectors, beside the one autofaiss would: no index built.

For each pool size n, dimension and memory budget: sept's choice (``choose_factory``), its IVF
lists, its training sample (``resolve_train_size``) and its estimated memory (``index_bytes``),
beside autofaiss's first recommendation (``get_optimal_index_keys_v2``), lists, training sample
(``get_optimal_train_size``, with build_index's default current_memory_available of 32G) and
estimated size (``IndexMetadata.estimated_index_size_in_bytes``). autofaiss always takes a budget:
where sept has none, autofaiss gets its build_index default, 16G.

autofaiss needs numpy < 2, so it runs in a venv of its own, made once with

    python3.11 -m venv /tmp/af-venv && /tmp/af-venv/bin/pip install autofaiss faiss-cpu "pyarrow<18"

and is called there by subprocess:

    .venv/bin/python benchmarks/index_chooser.py --autofaiss-python /tmp/af-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess

from sept.errors import SeptError
from sept.index.spec import (
    choose_factory,
    factory_lists,
    format_bytes,
    index_bytes,
    parse_bytes,
    resolve_train_size,
)

AUTOFAISS = r"""
import json, sys
from autofaiss.external.metadata import IndexMetadata
from autofaiss.external.optimize import get_optimal_index_keys_v2, get_optimal_train_size, index_key_to_nb_cluster
import autofaiss
rows = []
for n, dim, budget in json.loads(sys.argv[1]):
    keys = get_optimal_index_keys_v2(n, dim, budget)
    key = keys[0] if keys else None
    row = dict(key=key)
    if key:
        try:
            row["nlist"] = index_key_to_nb_cluster(key)
            row["train"] = get_optimal_train_size(n, key, "32G", dim)
        except ValueError:  # HNSW or Flat: no clusters, no training
            row["nlist"], row["train"] = 0, 0
        row["bytes"] = IndexMetadata(key, n, dim).estimated_index_size_in_bytes()
    rows.append(row)
version = getattr(autofaiss, "__version__", None)
if version is None:
    from importlib.metadata import version as v
    version = v("autofaiss")
print(json.dumps(dict(version=version, rows=rows)))
"""

SIZES = [10**6, 10**7, 10**8, 10**9]
DIMS = [128, 768]
BUDGETS = [None, "16G", "64G"]
AUTOFAISS_DEFAULT_BUDGET = "16G"  # autofaiss.build_index's max_index_memory_usage default


def sept_row(n: int, dim: int, budget: str | None) -> dict:
    try:
        factory, _ = choose_factory(n, dim, parse_bytes(budget))
    except SeptError as exc:
        return dict(key=f"none fits ({str(exc).split('the smallest, ')[-1].split(',')[0]})")
    nlist = factory_lists(factory)
    return dict(key=factory, nlist=nlist, train=resolve_train_size(factory, n)[0], bytes=index_bytes(factory, n, dim))


def _count(v: int | None) -> str:
    if not v:
        return "-"
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if v >= size:
            return f"{v / size:.3g}{unit}"
    return str(v)


def _cells(row: dict) -> list[str]:
    if "nlist" not in row:
        return [f"`{row['key']}`" if row.get("key") else "none", "-", "-", "-"]
    return [f"`{row['key']}`", str(row["nlist"] or "-"), _count(row["train"]), format_bytes(row["bytes"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autofaiss-python", required=True, help="python of a venv with autofaiss installed")
    args = parser.parse_args()
    cases = [(n, dim, budget) for n in SIZES for dim in DIMS for budget in BUDGETS]
    proc = subprocess.run(
        [
            args.autofaiss_python,
            "-c",
            AUTOFAISS,
            json.dumps([(n, d, b or AUTOFAISS_DEFAULT_BUDGET) for n, d, b in cases]),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"sept choose_factory against autofaiss {theirs['version']} get_optimal_index_keys_v2 "
        "(first key); no index built"
    )
    print()
    print(
        "| n | dim | budget | sept factory | lists | train | est. memory "
        "| autofaiss factory | lists | train | est. memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (n, dim, budget), af in zip(cases, theirs["rows"], strict=True):
        shown = budget or f"none (autofaiss: {AUTOFAISS_DEFAULT_BUDGET})"
        cells = [_count(n), str(dim), shown, *_cells(sept_row(n, dim, budget)), *_cells(af)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
