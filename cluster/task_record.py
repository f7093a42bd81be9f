"""What ``sept select`` records of one chosen task: its choice rows, its queries' neighbours, the pool
samples its leakage guard excluded, and its summary (``sept.data.selection_folder`` writes them).

Pure: numbers in, rows and dicts out; nothing here searches, copies or knows of Ray.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from sept.data.identity import split_ids
from sept.data.task_list import TaskSpec
from sept.index.dedup_table import DedupTable
from sept.index.strategies import Choice

log = logging.getLogger(__name__)


@dataclass
class SelectionTask:
    """One task of a selection run: its spec, its target's train images (the queries) and held-out images."""

    spec: TaskSpec
    classes: list[str]
    query_refs: list[str]
    query_names: list[str]
    query_class: np.ndarray
    heldout_refs: list[str]
    heldout: int = 0
    xq: np.ndarray | None = None
    xh: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class TaskRecords:
    choice: Iterable[dict]  # one row per chosen sample, made as it is written: never all at once
    queries: Iterable[dict]  # one row per target image, made as it is written
    leakage: list[dict]
    summary: dict


def task_records(
    t: SelectionTask,
    choice: Choice,
    neighbours,
    leaked: dict[int, tuple[int, float]],
    *,
    settings: dict,
    extra: dict,
    dedup: DedupTable | None = None,
) -> TaskRecords:
    """The files of a chosen task. ``settings`` is the task's config (task.json): strategy, balance, topk_share,
    min_similarity, near_dup_threshold, leakage_guard and leakage_threshold; ``extra`` goes into
    the summary as it is (the strategy's own figures). With the pool's ``dedup`` table, a chosen
    sample that stands for removed copies says how many (``stands_for``)."""
    names, classes = t.query_names, t.classes
    cls_of = [classes[c] for c in t.query_class.tolist()]
    stands_for = dedup.stands_for(choice.ids) if dedup is not None else None
    rows = _choice_rows(choice, names, cls_of, stands_for)
    queries = (  # made as written, like the choice rows
        dict(image=names[q], ref=t.query_refs[q], cls=cls_of[q], neighbours=[[int(i), float(s)] for i, s in nb])
        for q, nb in enumerate(neighbours)
    )
    shard_idx, positions = split_ids(np.asarray(sorted(leaked), np.int64))
    leakage = [
        dict(
            id=pid,
            source_index=int(s),
            position=int(p),
            heldout=os.path.relpath(t.heldout_refs[leaked[pid][0]], t.spec.target),
            similarity=leaked[pid][1],
        )
        for pid, s, p in zip(sorted(leaked), shard_idx.tolist(), positions.tolist())
    ]
    summary = _summary(t, choice, leaked, settings, extra)
    summary["duplicates"].update(
        pool_dedup=dedup is not None,
        dedup_removed_skipped=choice.dedup_skipped,
        chosen_standing_for_copies=int(np.count_nonzero(stands_for)) if stands_for is not None else 0,
    )
    _warn(t, choice, leaked, settings)
    return TaskRecords(choice=rows, queries=queries, leakage=leakage, summary=summary)


_ROWS_PER_BLOCK = 4096  # choice rows turned into Python values at once: never a list of every sample


def _choice_rows(choice: Choice, names: list[str], cls_of: list[str], stands_for: np.ndarray | None) -> Iterator[dict]:
    retrievers = choice.retrieved_by
    for start in range(0, len(choice), _ROWS_PER_BLOCK):
        block = slice(start, start + _ROWS_PER_BLOCK)
        ids, scores, chosen_by = (a[block].tolist() for a in (choice.ids, choice.scores, choice.chosen_by))
        for j, (pid, score, q) in enumerate(zip(ids, scores, chosen_by), start):
            row = dict(
                id=pid, score=score, chosen_by=names[q], cls=cls_of[q], retrieved_by=[names[r] for r in retrievers[j]]
            )
            if stands_for is not None and stands_for[j]:
                row["stands_for"] = int(stands_for[j])  # removed copies of this sample in the pool
            yield row


def _summary(t: SelectionTask, choice: Choice, leaked: dict, settings: dict, extra: dict) -> dict:
    classes = t.classes
    images = np.bincount(t.query_class, minlength=len(classes))
    chosen = (
        np.bincount(t.query_class[choice.chosen_by], minlength=len(classes))
        if len(choice)
        else np.zeros(len(classes), int)
    )
    if settings["balance"] == "class":
        share = np.full(len(classes), t.spec.budget / max(1, int((images > 0).sum())))
    else:
        share = t.spec.budget * images / max(1, images.sum())
    return dict(
        task=t.spec.name,
        budget=t.spec.budget,
        selected=len(choice),
        queries=len(t.query_names),
        strategy=settings["strategy"],
        balance=settings["balance"],
        topk_share=settings["topk_share"],
        min_similarity=settings["min_similarity"],
        scores=dict(
            min=float(choice.scores.min()) if len(choice) else None,
            max=float(choice.scores.max()) if len(choice) else None,
            mean=float(choice.scores.mean()) if len(choice) else None,
        ),
        per_class={
            classes[c]: dict(images=int(images[c]), share=round(float(share[c]), 2), selected=int(chosen[c]))
            for c in range(len(classes))
        },
        duplicates=dict(
            retrieved_by_several=int(np.count_nonzero(choice.retrieved_by.counts() > 1)),
            near_dup_threshold=settings["near_dup_threshold"],
            near_duplicates_dropped=len(choice.near_duplicates),
        ),
        leakage=dict(
            enabled=settings["leakage_guard"],
            threshold=settings["leakage_threshold"] if settings["leakage_guard"] else None,
            heldout_images=t.heldout,
            pool_matches=len(leaked),
            skipped=choice.leaked_skipped,
        ),
        **extra,
    )


def _warn(t: SelectionTask, choice: Choice, leaked: dict, settings: dict) -> None:
    if len(leaked) > 10 * max(1, t.heldout):
        log.warning(
            "select: task %s: %d pool samples are within %.3f of its %d held-out images; the encoder may "
            "not tell images apart at that similarity: consider a higher --leakage-threshold",
            t.spec.name,
            len(leaked),
            settings["leakage_threshold"],
            t.heldout,
        )
    if len(choice) < t.spec.budget:
        log.warning(
            "select: task %s got %d of its budget %d (similarity floor, leakage guard or a small pool)",
            t.spec.name,
            len(choice),
            t.spec.budget,
        )
