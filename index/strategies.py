"""Choosing what to keep: target images' neighbours in, one deduplicated selection out. Math only, no Ray.

Every strategy turns its candidates into *streams*: ordered lists of (pool id, similarity, the
target image that proposed it), each with a weight, held as positions into one table of
candidates (``Candidates``: the search results themselves, never copied). ``fill`` then takes from the streams in
turn, always from the one that is furthest below its weighted share, until the budget is full:

* ``instance`` (SEPT's per-instance search, the default): one stream per balance group, holding
  its target images' neighbours rank by rank (rank 0 of every image, then rank 1, ...), so each
  target image gets an equal share. With ``balance="class"`` there is one stream per class of
  equal weight, so each class gets an equal share, split evenly over its images.
* ``topk``: one stream of all (image, neighbour) pairs by similarity: the global top scores.
  With ``balance="class"``, one such stream per class, of equal weight.
* ``instance`` with ``topk_share`` s: the two above, the top scores taking a share s of the
  budget (``mix_streams``). ``select``'s default, class balance with a half share, was chosen by
  measurement (benchmarks/RESULTS.md, "Retrieval quality"): a global top-k alone collapses when a
  few target images sit among many similar off-target pool images, while the class-balanced mix
  was never worse than the round robin on any encoder measured there.
* ``cluster``: k-means on the pool's embeddings; the clusters the target images fall into are
  kept, one stream each, weighted by how many target images fell in, members ordered by their
  similarity to those images (DINOv2's curation by retrieval of clusters).

A pool sample reached again is kept once, with its best similarity and every target image
that retrieved it. Samples in ``excluded`` (the leakage guard) and near-duplicates of samples
already kept (``sept.index.dedup.NearDuplicateFilter``) are skipped and counted. Every order is
total (ties broken by id, then stream index), so a choice is a pure function of its inputs.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

from sept.index.dedup import NearDuplicateFilter, normalize

STRATEGIES = ("instance", "topk", "cluster")
BALANCES = ("instance", "class")


@dataclass(frozen=True, eq=False)
class Candidates:
    """Search results as one flat table of candidates, shared by every stream built from them and
    never copied: candidate p is pool id ``ids[p]`` with similarity ``scores[p]``, proposed by
    target image ``queries[p]``. For (S, I) results the table is the matrices raveled, and the
    query is the row, ``p // per_query`` (through ``rows`` when the results are some images'
    only), so that column costs nothing."""

    ids: np.ndarray  # (n,) int64
    scores: np.ndarray  # (n,) float32
    queries: np.ndarray | None = None  # (n,) int32, or None for row-major (S, I) results
    per_query: int = 1
    rows: np.ndarray | None = None  # (S, I)'s row r holds target image rows[r]; None: image r

    @classmethod
    def from_results(cls, S: np.ndarray, I: np.ndarray, rows: np.ndarray | None = None) -> Candidates:
        I = np.ascontiguousarray(I, dtype=np.int64)  # copies only what is not already so
        S = np.ascontiguousarray(S, dtype=np.float32)
        rows = None if rows is None else np.asarray(rows, np.int32)
        return cls(ids=I.reshape(-1), scores=S.reshape(-1), per_query=max(1, I.shape[1]), rows=rows)

    def query_of(self, positions: np.ndarray) -> np.ndarray:
        if self.queries is not None:
            return self.queries[positions]
        row = (positions // self.per_query).astype(np.int32)
        return row if self.rows is None else self.rows[row]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class NeighbourBlock:
    """Search results of some of a task's target images, all searched with one k: image
    ``rows[r]``'s neighbours are ``I[r]`` with similarities ``S[r]``, best first. A task's results
    are one block, or with a k per class one block per class (``choose_blocks``)."""

    rows: np.ndarray  # (m,) the target images' rows, ascending
    S: np.ndarray  # (m, k) similarity, higher is better
    I: np.ndarray  # (m, k) pool ids, -1 for padding

    @classmethod
    def whole(cls, S: np.ndarray, I: np.ndarray) -> NeighbourBlock:
        return cls(rows=np.arange(len(I)), S=S, I=I)


def _positions_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


@dataclass
class Stream:
    """Candidates in the order they are to be taken: positions into a ``Candidates`` table, 4 bytes
    a candidate, however many streams (instance, top-k, mixed) share the table."""

    source: Candidates
    positions: np.ndarray  # (n,) int32 (int64 past 2^31 candidates) into ``source``
    weight: float = 1.0
    bound: float = -np.inf
    """Best similarity a candidate beyond this stream's end could have; -inf when nothing lies beyond
    (every target image's neighbour list ended, or fell below the similarity threshold)."""
    sorted_by_score: bool = False
    name: str = ""
    cluster: int = -1  # the k-means cluster a cluster-strategy stream holds

    @classmethod
    def from_arrays(cls, ids: np.ndarray, scores: np.ndarray, queries: np.ndarray, **kw) -> Stream:
        """A stream owning its candidates, in the order given."""
        source = Candidates(
            ids=np.asarray(ids, np.int64), scores=np.asarray(scores, np.float32), queries=np.asarray(queries, np.int32)
        )
        return cls(source=source, positions=np.arange(len(source), dtype=_positions_dtype(len(source))), **kw)

    @property
    def ids(self) -> np.ndarray:
        return self.source.ids[self.positions]

    @property
    def scores(self) -> np.ndarray:
        return self.source.scores[self.positions]

    @property
    def queries(self) -> np.ndarray:
        return self.source.query_of(self.positions)

    def __len__(self) -> int:
        return len(self.positions)


@dataclass
class Retrievers:
    """Every query that retrieved each chosen sample, as compressed rows (CSR): sample j's queries are
    ``queries[indptr[j]:indptr[j + 1]]``, sorted. Two arrays, not a list per sample."""

    indptr: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    queries: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    @classmethod
    def from_pairs(cls, sample: np.ndarray, query: np.ndarray, n: int) -> Retrievers:
        """From (chosen sample j, query) pairs, in any order, repeats allowed."""
        order = np.lexsort((query, sample))
        sample, query = sample[order], query[order]
        first = np.ones(len(sample), bool)
        first[1:] = (sample[1:] != sample[:-1]) | (query[1:] != query[:-1])
        sample, query = sample[first], query[first]
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(sample, minlength=n), out=indptr[1:])
        return cls(indptr=indptr, queries=query)

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> Retrievers:
        sample = np.repeat(np.arange(len(lists), dtype=np.int64), [len(q) for q in lists])
        query = np.fromiter((q for qs in lists for q in qs), np.int64, len(sample))
        return cls.from_pairs(sample, query, len(lists))

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, j: int) -> list[int]:
        return self.queries[self.indptr[j] : self.indptr[j + 1]].tolist()

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)


@dataclass
class Choice:
    ids: np.ndarray  # (n,) int64 chosen pool ids, in the order they were chosen
    scores: np.ndarray  # (n,) float32 best similarity of each chosen id
    chosen_by: np.ndarray  # (n,) int64 the query whose turn chose it
    stream_of: np.ndarray  # (n,) int64 the stream it was taken from
    retrieved_by: Retrievers = field(default_factory=Retrievers)  # every query that retrieved it
    taken: list[int] = field(default_factory=list)  # per stream
    leaked_skipped: int = 0  # distinct excluded ids met while filling
    dedup_skipped: int = 0  # distinct ids met that the pool's dedup table removed
    near_duplicates: dict[int, int] = field(default_factory=dict)  # skipped id -> the chosen id it duplicates
    needs_more_neighbours: bool = False
    """A stream ran short, or took candidates worse than what lies beyond its k neighbours:
    searching again with a larger k could change the choice."""
    neighbours_factor: float = 1.0
    """How many times the searched k the next search should ask for: a stream that ran short took
    ``taken`` of its ``wanted`` share, so about wanted/taken times the neighbours fill it (2 when
    the shortfall says nothing, as for the pure top-k's exactness)."""

    def __len__(self) -> int:
        return len(self.ids)


# ---- building streams from search results ------------------------------------------------------


def _valid(S: np.ndarray, I: np.ndarray, min_similarity: float | None) -> np.ndarray:
    valid = (I >= 0) & np.isfinite(S)
    if min_similarity is not None:
        valid &= S >= min_similarity
    return valid


def _bound(S: np.ndarray, valid: np.ndarray, rows) -> float:
    """Candidates beyond k exist only for rows whose k-th neighbour is still valid."""
    rows = np.asarray(rows)
    if len(rows) == 0 or S.shape[1] == 0:
        return -np.inf
    last = valid[rows, -1]
    return float(S[rows, -1][last].max()) if last.any() else -np.inf


def instance_streams(
    S: np.ndarray,
    I: np.ndarray,
    query_class: np.ndarray | None = None,
    *,
    balance: str = "instance",
    min_similarity: float | None = None,
    source: Candidates | None = None,
) -> list[Stream]:
    """Per-instance streams: rank-major over a group's queries; one group, or one per class."""
    nq, k = I.shape
    source = Candidates.from_results(S, I) if source is None else source
    valid = _valid(S, I, min_similarity).reshape(-1)
    dtype = _positions_dtype(len(source))
    streams = []
    for name, rows in _groups(nq, query_class, balance):
        rank_major = (rows[None, :].astype(np.int64) * k + np.arange(k)[:, None]).reshape(-1)
        streams.append(
            Stream(
                source=source,
                positions=rank_major[valid[rank_major]].astype(dtype),
                bound=_bound(S, valid.reshape(nq, k), rows),
                name=name,
            )
        )
    return streams


def _groups(nq: int, query_class: np.ndarray | None, balance: str) -> list[tuple[str, np.ndarray]]:
    """Query rows sharing one stream: all of them, or one group per class."""
    if balance not in BALANCES:
        raise ValueError(f"unknown balance {balance!r}; expected one of {BALANCES}")
    if balance == "class":
        if query_class is None:
            raise ValueError("balance='class' needs the class of every query")
        query_class = np.asarray(query_class)
        return [(str(c), np.flatnonzero(query_class == c)) for c in np.unique(query_class)]
    return [("all", np.arange(nq))]


def topk_streams(
    S: np.ndarray,
    I: np.ndarray,
    query_class: np.ndarray | None = None,
    *,
    balance: str = "instance",
    min_similarity: float | None = None,
    source: Candidates | None = None,
) -> list[Stream]:
    """Every distinct neighbour by its best similarity, best first (ties by id, then query): one
    stream, or with ``balance="class"`` one stream of equal weight per class (its images'
    neighbours only)."""
    nq, k = I.shape
    source = Candidates.from_results(S, I) if source is None else source
    valid = _valid(S, I, min_similarity)
    dtype = _positions_dtype(len(source))
    streams = []
    for name, rows in _groups(nq, query_class, balance):
        row_major = (rows[:, None].astype(np.int64) * k + np.arange(k)[None, :])[valid[rows]]
        ids = source.ids[row_major]
        # Positions grow with the query row, so they break ties as the query would.
        order = np.lexsort((row_major, ids, -source.scores[row_major]))
        row_major, ids = row_major[order], ids[order]
        _, first = np.unique(ids, return_index=True)  # the first occurrence is the best
        streams.append(
            Stream(
                source=source,
                positions=row_major[np.sort(first)].astype(dtype),
                bound=_bound(S, valid, rows),
                sorted_by_score=True,
                name="topk" if balance == "instance" else f"topk:{name}",
            )
        )
    return streams


def mix_streams(groups: Sequence[Sequence[Stream]], fractions: Sequence[float]) -> list[Stream]:
    """The streams of several strategies as one list for ``sept.index.strategies.fill``, weighted
    so that group g takes ``fractions[g]`` of the budget (fractions are normalised to sum to 1;
    within a group the streams keep their relative weights). ``fill`` deduplicates across groups
    and hands a group's unused share to the others when it runs out."""
    if len(groups) != len(fractions) or not groups:
        raise ValueError("one fraction per group, at least one group")
    fractions = np.asarray(fractions, dtype=np.float64)
    if np.any(fractions < 0) or fractions.sum() <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {fractions.tolist()}")
    fractions = fractions / fractions.sum()
    mixed: list[Stream] = []
    for group, fraction in zip(groups, fractions):
        total = float(sum(st.weight for st in group))
        if fraction == 0 or total <= 0:
            continue
        mixed += [dataclasses.replace(st, weight=st.weight * fraction / total) for st in group]
    return mixed


# ---- filling the budget ------------------------------------------------------------------------


_BLOCK = 1 << 16  # entries looked at in one numpy step: bounds the temporaries of a large search


def _universe(sources: Sequence[Candidates]) -> np.ndarray:
    """Every distinct id of the sources, sorted: built block by block and sorted in place, so its
    temporaries stay near the size of the result rather than of every candidate."""
    pieces = [np.unique(src.ids[i : i + _BLOCK]) for src in sources for i in range(0, len(src), _BLOCK)]
    if not pieces:
        return np.zeros(0, np.int64)
    universe = np.concatenate(pieces)
    del pieces
    universe.sort()
    keep = np.ones(len(universe), bool)
    np.not_equal(universe[1:], universe[:-1], out=keep[1:])
    return universe[keep]


def _codes(universe: np.ndarray, src: Candidates) -> np.ndarray:
    """Each candidate of ``src`` as the position of its id in ``universe``."""
    codes = np.empty(len(src), _positions_dtype(len(universe)))
    for i in range(0, len(src), _BLOCK):
        codes[i : i + _BLOCK] = np.searchsorted(universe, src.ids[i : i + _BLOCK])
    return codes


# A skipped state's "met" mark is the state with its low bit set: excluded 2 -> 3, removed 4 -> 5.
_FREE, _CHOSEN, _EXCLUDED, _EXCLUDED_MET, _REMOVED, _REMOVED_MET = 0, 1, 2, 3, 4, 5


def fill(
    streams: list[Stream],
    budget: int,
    *,
    excluded: set[int] | frozenset = frozenset(),
    near_dup: NearDuplicateFilter | None = None,
    removed: np.ndarray | None = None,
) -> Choice:
    """Take candidates from the streams, each turn from the one furthest below its weighted share.

    ``excluded`` (the leakage guard's few ids) and ``removed`` (the dedup table's ids, an array:
    it may be large) are skipped and counted apart.

    The state is a few bytes a candidate and a sample: the streams are positions into their
    candidate tables, every candidate is coded once by its id's place among the distinct ids, one
    mark per distinct id says free, chosen, excluded or removed (and met), and the chosen arrays
    are written as the loop goes; never Python objects per sample, so a budget of 10^8 fits a
    coordinator's memory. Memoryviews give the loop plain Python scalars.
    """
    if budget < 0:
        raise ValueError(f"budget must be non-negative, got {budget}")
    sources = list({id(st.source): st.source for st in streams}.values())
    universe = _universe(sources)
    codes = {id(src): memoryview(_codes(universe, src)) for src in sources}
    marks = np.zeros(len(universe), np.uint8)
    if excluded:
        marks[np.isin(universe, np.fromiter(excluded, np.int64, len(excluded)))] = _EXCLUDED
    if removed is not None and len(removed):
        marks[(marks == _FREE) & np.isin(universe, removed)] = _REMOVED
    cap = min(int(budget), len(universe))
    del universe  # pool ids are read from the candidate tables from here on
    ids = np.empty(cap, np.int64)
    scores = np.empty(cap, np.float32)
    chosen_by = np.empty(cap, np.int32)
    stream_of = np.empty(cap, np.int32)
    mark = memoryview(marks)
    out_id, out_score, out_query, out_stream = (memoryview(a) for a in (ids, scores, chosen_by, stream_of))
    position_of = [memoryview(np.ascontiguousarray(st.positions)) for st in streams]
    code_of = [codes[id(st.source)] for st in streams]
    id_of = [memoryview(st.source.ids) for st in streams]
    score_of = [memoryview(st.source.scores) for st in streams]
    query_of = [memoryview(st.source.queries) if st.source.queries is not None else None for st in streams]
    per_query = [st.source.per_query for st in streams]
    row_of = [memoryview(st.source.rows) if st.source.rows is not None else None for st in streams]
    taken = [0] * len(streams)
    lowest = [np.inf] * len(streams)
    ran_out = [False] * len(streams)
    position = [0] * len(streams)
    turns = [(0.0, s) for s, st in enumerate(streams) if st.weight > 0]
    heapq.heapify(turns)
    n = 0
    while turns and n < budget:  # past cap nothing is left to take, but a stream learns it ran out
        _, s = heapq.heappop(turns)
        positions_s, codes_s, end, p = position_of[s], code_of[s], len(position_of[s]), position[s]
        accepted = False
        while p < end:
            at = positions_s[p]
            p += 1
            c = codes_s[at]
            state = mark[c]
            if state == _CHOSEN:
                continue
            if state != _FREE:
                mark[c] = state | 1
                continue
            pool_id = id_of[s][at]
            if near_dup is not None:
                if near_dup.duplicate_of(pool_id) is not None:
                    continue
                near_dup.accept(pool_id)
            mark[c] = _CHOSEN
            score = score_of[s][at]
            if query_of[s] is not None:
                query = query_of[s][at]
            else:
                query = at // per_query[s] if row_of[s] is None else row_of[s][at // per_query[s]]
            out_id[n], out_score[n], out_query[n], out_stream[n] = pool_id, score, query, s
            n += 1
            if score < lowest[s]:
                lowest[s] = score
            accepted = True
            break
        position[s] = p
        if not accepted:
            ran_out[s] = True
            continue
        taken[s] += 1
        heapq.heappush(turns, (taken[s] / streams[s].weight, s))
    needs_more = any(
        st.bound > -np.inf and (ran_out[s] or (st.sorted_by_score and taken[s] and lowest[s] < st.bound))
        for s, st in enumerate(streams)
    )
    total_weight = sum(st.weight for st in streams if st.weight > 0) or 1.0
    short = [
        budget * st.weight / total_weight / max(1, taken[s])
        for s, st in enumerate(streams)
        if st.bound > -np.inf and ran_out[s] and st.weight > 0
    ]
    factor = max([2.0, *short]) if needs_more else 1.0
    return Choice(
        ids=_first(ids, n),
        scores=_first(scores, n),
        chosen_by=_first(chosen_by, n),
        stream_of=_first(stream_of, n),
        taken=taken,
        leaked_skipped=int(np.count_nonzero(marks == _EXCLUDED_MET)),
        dedup_skipped=int(np.count_nonzero(marks == _REMOVED_MET)),
        near_duplicates=dict(near_dup.duplicates) if near_dup is not None else {},
        needs_more_neighbours=needs_more,
        neighbours_factor=float(factor),
    )


def _first(a: np.ndarray, n: int) -> np.ndarray:
    return a if n == len(a) else a[:n].copy()  # a view would keep the whole allocation alive


def _lookup(sorted_ids: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every entry of I: its position in ``sorted_ids`` (clipped), and whether it is there."""
    if not len(sorted_ids):
        return np.zeros(I.shape, np.int64), np.zeros(I.shape, bool)
    at = np.minimum(np.searchsorted(sorted_ids, I), len(sorted_ids) - 1)
    return at, sorted_ids[at] == I


def _row_blocks(nq: int, k: int) -> range:
    """Starts of blocks of rows of (S, I) holding about ``_BLOCK`` entries each."""
    return range(0, nq, max(1, _BLOCK // max(1, k)))


def attach_retrievers(
    choice: Choice, blocks: Sequence[NeighbourBlock], *, min_similarity: float | None = None
) -> Choice:
    """Fill ``retrieved_by`` (every query with the id among its valid neighbours) and best scores.

    Two passes over the results, block by block in query order: the first counts each chosen
    sample's retrievers (the CSR row lengths), the second writes them in place, so nothing but
    the CSR arrays grows with the budget."""
    n = len(choice)
    order = np.argsort(choice.ids, kind="stable").astype(_positions_dtype(n))
    sorted_ids = choice.ids[order]

    def chosen_pairs() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per block of rows: (chosen sample j, query, similarity) of its valid neighbours, one per
        (j, query), sorted by j and then query."""
        for block in blocks:
            starts = _row_blocks(*block.I.shape)
            for start in starts:
                Ib, Sb = block.I[start : start + starts.step], block.S[start : start + starts.step]
                at, chosen = _lookup(sorted_ids, Ib)
                q, r = np.nonzero(_valid(Sb, Ib, min_similarity) & chosen)
                j = order[at[q, r]]
                _, once = np.unique(j.astype(np.int64) * len(Ib) + q, return_index=True)  # a repeated id counts once
                yield j[once], block.rows[start + q[once]].astype(np.int32), Sb[q[once], r[once]]

    indptr = np.zeros(n + 1, np.int64)
    if n:
        for j, _, sims in chosen_pairs():
            indptr[1:] += np.bincount(j, minlength=n)
            np.maximum.at(choice.scores, j, sims)
        np.cumsum(indptr, out=indptr)
    indptr = indptr.astype(_positions_dtype(int(indptr[-1])))
    queries = np.empty(int(indptr[-1]), np.int32)
    if n:
        for j, q, _ in chosen_pairs():  # indptr[j] is sample j's write cursor until the shift below
            first = np.ones(len(j), bool)
            first[1:] = j[1:] != j[:-1]
            group_start = np.flatnonzero(first)
            group_size = np.diff(np.append(group_start, len(j)))
            queries[indptr[j] + (np.arange(len(j)) - np.repeat(group_start, group_size))] = q
            indptr[j[first]] += group_size
        for end in range(n, 0, -_BLOCK):  # back from cursors (each row's end) to starts, in place
            lo = max(0, end - _BLOCK)
            indptr[lo + 1 : end + 1] = indptr[lo:end].copy()
        indptr[0] = 0
        if len(blocks) > 1:  # blocks of interleaved rows: each sample's queries in order again
            sample = np.repeat(np.arange(n, dtype=np.int32), np.diff(indptr))
            queries = queries[np.lexsort((queries, sample))]
    choice.retrieved_by = Retrievers(indptr=indptr, queries=queries)
    return choice


def query_neighbours(
    choice: Choice, blocks: Sequence[NeighbourBlock] | None, nq: int, top: int = 16
) -> Iterator[list[tuple[int, float]]]:
    """For each query in turn, its chosen neighbours best first (id, similarity), at most ``top``:
    what the report shows. Made a block of queries at a time, as the rows are written; without
    search results (the cluster strategy), each query's own choices."""
    if blocks is None:
        order = np.lexsort((choice.ids, -choice.scores, choice.chosen_by))
        starts = np.searchsorted(choice.chosen_by[order], np.arange(nq + 1))
        for q in range(nq):
            mine = order[starts[q] : min(starts[q + 1], starts[q] + top)]
            yield list(zip(choice.ids[mine].tolist(), choice.scores[mine].astype(float).tolist()))
        return
    sorted_ids = np.sort(choice.ids)
    step = _row_blocks(nq, max(b.I.shape[1] for b in blocks) if blocks else 1).step
    for lo in range(0, nq, step):
        shown: list[list[tuple[int, float]]] = [[] for _ in range(min(step, nq - lo))]
        for block in blocks:  # the block's rows among queries lo .. lo + step
            a, b = np.searchsorted(block.rows, [lo, lo + step])
            Ib, Sb = block.I[a:b], block.S[a:b]
            keep = _lookup(sorted_ids, Ib)[1] & np.isfinite(Sb)
            primary = np.where(keep, -Sb, np.inf)
            order = np.lexsort((np.where(keep, Ib, np.iinfo(np.int64).max), primary), axis=1)[:, :top]
            ids_b = np.take_along_axis(Ib, order, axis=1).tolist()
            sims_b = np.take_along_axis(Sb, order, axis=1).tolist()
            kept_b = np.take_along_axis(keep, order, axis=1).tolist()
            for row, ids_q, sims_q, kept_q in zip(block.rows[a:b].tolist(), ids_b, sims_b, kept_b):
                shown[row - lo] = [(i, s) for i, s, k in zip(ids_q, sims_q, kept_q) if k]
        yield from shown


def choose(S: np.ndarray, I: np.ndarray, budget: int, **kw) -> Choice:
    """``choose_blocks`` for results of every target image searched with one k."""
    return choose_blocks([NeighbourBlock.whole(S, I)], budget, **kw)


def choose_blocks(
    blocks: Sequence[NeighbourBlock],
    budget: int,
    *,
    strategy: str = "instance",
    balance: str = "instance",
    query_class: np.ndarray | None = None,
    min_similarity: float | None = None,
    excluded: set[int] | frozenset = frozenset(),
    near_dup: NearDuplicateFilter | None = None,
    topk_share: float = 0.0,
    removed: np.ndarray | None = None,
) -> Choice:
    """The search-based strategies end to end: streams, fill, retrievers.

    ``topk_share`` (instance strategy only) gives that fraction of the budget to the top scores
    and the rest to the per-instance round robin: the round robin keeps every target image
    represented, the top scores add the samples the target is surest of. ``balance`` applies to
    both: with "class", every class gets an equal share of each. The mix's top scores are taken
    among each image's k nearest (k sized from its share), not over the whole pool: finding the
    pool-wide top would mean searching again with ever larger k, and one image among many similar
    off-target pool samples would take them all.

    With class balance each class may come in its own block, searched with its own k (a class of
    few images needs more neighbours per image for its share than a class of many); a class never
    spans two blocks. Without class balance the results are one block."""
    if not 0.0 <= topk_share <= 1.0:
        raise ValueError(f"topk_share must lie in [0, 1], got {topk_share}")
    if strategy not in ("instance", "topk"):
        raise ValueError(f"strategy {strategy!r} is not search-based; expected 'instance' or 'topk'")
    if balance != "class" and len(blocks) != 1:
        raise ValueError(
            f"balance {balance!r} shares the budget over every image: one block of results, not {len(blocks)}"
        )
    parts = []  # per block: its images' classes and its one candidate table, coded once in fill
    for block in blocks:
        classes = None if query_class is None else np.asarray(query_class)[block.rows]
        rows = None if len(blocks) == 1 and np.array_equal(block.rows, np.arange(len(block.rows))) else block.rows
        parts.append((block, classes, Candidates.from_results(block.S, block.I, rows)))
    if len(blocks) > 1 and len({c for _, classes, _ in parts for c in np.unique(classes).tolist()}) != sum(
        len(np.unique(classes)) for _, classes, _ in parts
    ):
        raise ValueError("a class spans two blocks of results")

    def streams_of(make, parts=parts) -> list[Stream]:
        out = []
        for block, classes, source in parts:
            out += make(block.S, block.I, classes, balance=balance, min_similarity=min_similarity, source=source)
        return out

    if strategy == "instance":
        streams = streams_of(instance_streams)
        if topk_share > 0:
            # In the mix the top scores are those among each image's k nearest, so no image takes
            # more than k of them: only the round robin running short asks for a larger k.
            top = [dataclasses.replace(st, bound=-np.inf) for st in streams_of(topk_streams)]
            streams = mix_streams([streams, top], [1.0 - topk_share, topk_share])
    else:
        streams = streams_of(topk_streams)
    choice = fill(streams, budget, excluded=excluded, near_dup=near_dup, removed=removed)
    del streams, parts, streams_of  # drop the candidate tables: the retrievers are found in the results
    return attach_retrievers(choice, blocks, min_similarity=min_similarity)


# ---- the cluster strategy ----------------------------------------------------------------------


def train_clusters(sample: np.ndarray, n_clusters: int, *, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Spherical k-means centroids (n_clusters, d) of a sample of pool embeddings."""
    x = normalize(sample)
    n_clusters = int(max(1, min(n_clusters, len(x))))
    km = faiss.Kmeans(
        x.shape[1],
        n_clusters,
        niter=niter,
        seed=seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, -(-len(x) // n_clusters)),
    )
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def _assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    _, a = index.search(normalize(x), 1)
    return a[:, 0]


@dataclass
class ClusterPlan:
    """Which clusters the target images fall into and how much weight each gets."""

    probes: int
    query_clusters: list[list[int]]  # per query: the clusters it falls into
    weights: dict[int, float]  # kept cluster -> weight
    members: int  # pool samples in the kept clusters


def cluster_streams(
    centroids: np.ndarray,
    xq: np.ndarray,
    pool: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    budget: int,
    *,
    query_class: np.ndarray | None = None,
    balance: str = "instance",
    min_similarity: float | None = None,
) -> tuple[list[Stream], ClusterPlan, list[list[int]]]:
    """Streams of the kept clusters' members, read from ``pool()`` (an iterable of (x, ids) blocks, read twice).

    Each target image falls into its nearest cluster; while those hold fewer than ``budget``
    samples, into its nearest two, three, ... Returns the streams, the plan, and per query the
    clusters it probed (for retrieved_by).
    """
    if balance not in BALANCES:
        raise ValueError(f"unknown balance {balance!r}; expected one of {BALANCES}")
    nq = len(xq)
    q = normalize(xq)
    c = normalize(centroids)
    ranking = np.lexsort((np.tile(np.arange(len(c)), (nq, 1)), -(q @ c.T)), axis=1)  # nearest first, ties by index
    counts = np.zeros(len(c), np.int64)
    for x, _ in pool():
        counts += np.bincount(_assign(x, c), minlength=len(c))
    probes = 1
    while True:
        kept = np.unique(ranking[:, :probes])
        if counts[kept].sum() >= budget or probes >= len(c):
            break
        probes += 1
    query_clusters = [sorted(ranking[i, :probes].tolist()) for i in range(nq)]
    share = np.full(nq, 1.0 / probes)
    if balance == "class":
        if query_class is None:
            raise ValueError("balance='class' needs the class of every query")
        qc = np.asarray(query_class)
        _, inverse, per_class = np.unique(qc, return_inverse=True, return_counts=True)
        share = share / per_class[inverse]
    weights: dict[int, float] = {}
    probing: dict[int, list[int]] = {}
    for i, clusters in enumerate(query_clusters):
        for cl in clusters:
            weights[cl] = weights.get(cl, 0.0) + float(share[i])
            probing.setdefault(cl, []).append(i)
    # Second pass: every kept cluster's members, with their best similarity to the images that probed it.
    found: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {cl: [] for cl in weights}
    for x, ids in pool():
        a = _assign(x, c)
        xn = normalize(x)
        for cl in np.unique(a):
            cl = int(cl)
            if cl not in weights:
                continue
            rows = np.flatnonzero(a == cl)
            sims = xn[rows] @ q[probing[cl]].T
            best = sims.argmax(axis=1)
            found[cl].append(
                (
                    np.asarray(ids)[rows].astype(np.int64),
                    sims[np.arange(len(rows)), best].astype(np.float32),
                    np.asarray(probing[cl])[best].astype(np.int64),
                )
            )
    streams = []
    for cl in sorted(weights):
        parts = found[cl]
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        scores = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
        queries = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
        if min_similarity is not None:
            keep = scores >= min_similarity
            ids, scores, queries = ids[keep], scores[keep], queries[keep]
        order = np.lexsort((ids, -scores))
        streams.append(
            Stream.from_arrays(
                ids[order],
                scores[order],
                queries[order],
                weight=weights[cl],
                sorted_by_score=True,
                name=f"cluster {cl}",
                cluster=cl,
            )
        )
    plan = ClusterPlan(
        probes=probes,
        query_clusters=query_clusters,
        weights=weights,
        members=int(counts[np.asarray(sorted(weights))].sum()),
    )
    return streams, plan, query_clusters


def choose_by_clusters(
    centroids: np.ndarray,
    xq: np.ndarray,
    pool: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    budget: int,
    *,
    query_class: np.ndarray | None = None,
    balance: str = "instance",
    min_similarity: float | None = None,
    excluded: set[int] | frozenset = frozenset(),
    near_dup: NearDuplicateFilter | None = None,
    removed: np.ndarray | None = None,
) -> tuple[Choice, ClusterPlan]:
    streams, plan, query_clusters = cluster_streams(
        centroids, xq, pool, budget, query_class=query_class, balance=balance, min_similarity=min_similarity
    )
    choice = fill(streams, budget, excluded=excluded, near_dup=near_dup, removed=removed)
    probing: dict[int, list[int]] = {}
    for i, clusters in enumerate(query_clusters):
        for cl in clusters:
            probing.setdefault(cl, []).append(i)
    choice.retrieved_by = Retrievers.from_lists([probing[streams[s].cluster] for s in choice.stream_of.tolist()])
    return choice, plan
