"""Choosing what to keep: per-instance and class-balanced round robin, global top-k, clusters,
similarity threshold, dedup with best score and every retriever, near-duplicates, leakage guard."""

import numpy as np
import pytest

from sept.index.dedup import NearDuplicateFilter, leaked_ids, normalize, to_similarity
from sept.index.strategies import choose, choose_by_clusters, instance_streams, train_clusters


def _disjoint(nq=4, k=10, seed=0):
    """Each query has its own neighbours; query q's scores are all higher than query q+1's."""
    rng = np.random.default_rng(seed)
    S = np.sort(rng.uniform(0, 0.1, size=(nq, k)), axis=1)[:, ::-1] + np.arange(nq)[::-1, None]
    I = (np.arange(nq)[:, None] * 1000 + np.arange(k)[None, :]).astype(np.int64)
    return S.astype(np.float32), I


def test_per_instance_gives_every_image_an_equal_share():
    S, I = _disjoint()
    c = choose(S, I, 12)
    assert np.bincount(c.chosen_by, minlength=4).tolist() == [3, 3, 3, 3]
    # each image's share is its own best neighbours, in rank order
    for q in range(4):
        assert sorted(c.ids[c.chosen_by == q].tolist()) == I[q, :3].tolist()


def test_class_balance_splits_the_budget_by_class_not_by_image():
    S, I = _disjoint(nq=5)
    cls = np.array([0, 0, 0, 0, 1])  # class 1 has a single image
    by_image = choose(S, I, 10, query_class=cls)
    by_class = choose(S, I, 10, query_class=cls, balance="class")
    assert np.bincount(cls[by_image.chosen_by]).tolist() == [8, 2]
    assert np.bincount(cls[by_class.chosen_by]).tolist() == [5, 5]
    assert np.bincount(by_class.chosen_by, minlength=5)[:4].sum() == 5


def test_topk_takes_the_global_best_scores():
    rng = np.random.default_rng(1)
    S = np.sort(rng.uniform(size=(6, 30)), axis=1)[:, ::-1].astype(np.float32)
    I = rng.integers(0, 60, size=(6, 30))
    for q in range(6):  # distinct within a row, as search results are
        I[q] = rng.permutation(200)[:30]
    c = choose(S, I, 15, strategy="topk")
    best = {}
    for s, i in zip(S.ravel(), I.ravel()):
        best[int(i)] = max(best.get(int(i), -1), float(s))
    expected = sorted(best, key=lambda i: (-best[i], i))[:15]
    assert c.ids.tolist() == expected
    np.testing.assert_allclose(c.scores, [best[i] for i in expected])


def test_topk_asks_for_more_neighbours_when_k_cuts_off_better_pairs():
    S, I = _disjoint(nq=3, k=2)  # query 0 has the best scores but only 2 of them were fetched
    assert choose(S, I, 4, strategy="topk").needs_more_neighbours
    S, I = _disjoint(nq=3, k=10)
    assert not choose(S, I, 4, strategy="topk").needs_more_neighbours


def test_per_instance_asks_for_more_when_a_stream_runs_short():
    S, I = _disjoint(nq=2, k=3)
    c = choose(S, I, 10)
    assert len(c) == 6 and c.needs_more_neighbours
    # ...but not when the lists ended for real (padding: the pool had nothing more)
    I2 = I.copy()
    I2[:, 2] = -1
    c2 = choose(to_similarity(S, I2, "ip"), I2, 10)
    assert len(c2) == 4 and not c2.needs_more_neighbours


def test_duplicates_kept_once_with_best_score_and_every_retriever():
    S = np.array([[0.9, 0.8, 0.7], [0.95, 0.6, 0.5], [0.4, 0.3, 0.2]], dtype=np.float32)
    I = np.array([[7, 8, 9], [7, 10, 8], [11, 7, 12]])
    c = choose(S, I, 5)
    assert len(set(c.ids.tolist())) == len(c) == 5
    j = c.ids.tolist().index(7)
    assert c.scores[j] == np.float32(0.95)
    assert c.retrieved_by[j] == [0, 1, 2]
    assert c.retrieved_by[c.ids.tolist().index(8)] == [0, 1]


def test_min_similarity_is_a_hard_floor():
    S = np.tile(np.linspace(1, 0, 10, dtype=np.float32), (3, 1))
    I = (np.arange(3)[:, None] * 1000 + np.arange(10)[None, :]).astype(np.int64)
    c = choose(S, I, 30, min_similarity=0.55)
    assert len(c) == 15 and (c.scores >= 0.55).all()
    assert not c.needs_more_neighbours, "what lies beyond k is below the floor anyway"
    S2, I2 = _disjoint(nq=3)  # rows 0 and 1 are above the floor to their k-th: more may lie beyond
    assert choose(S2, I2, 30, min_similarity=1.0).needs_more_neighbours


def test_leakage_guard_excludes_and_counts_and_still_fills_the_budget():
    S, I = _disjoint(nq=2, k=10)
    held_out_S = np.array([[0.99, 0.97, 0.5]], dtype=np.float32)
    held_out_I = np.array([[0, 1001, 3]])
    leaked, incomplete = leaked_ids(held_out_S, held_out_I, 0.95)
    assert set(leaked) == {0, 1001} and not incomplete
    assert leaked[1001] == (0, np.float32(0.97))
    c = choose(S, I, 6, excluded=set(leaked))
    assert not ({0, 1001} & set(c.ids.tolist()))
    assert len(c) == 6 and c.leaked_skipped == 2
    assert leaked_ids(np.array([[0.99, 0.98]]), np.array([[5, 6]]), 0.95)[1], "k-th still close: look further"


def test_near_duplicates_collapse_to_the_first_chosen():
    rng = np.random.default_rng(2)
    base = normalize(rng.normal(size=(10, 16)))
    vectors = {}
    for i, v in enumerate(base):
        vectors[i] = v
        vectors[100 + i] = normalize((v + 0.01 * rng.normal(size=16))[None])[0]  # near copy of i
    S = np.tile(np.linspace(1, 0.5, 20, dtype=np.float32), (1, 1))
    I = np.array([[i for pair in zip(range(10), range(100, 110)) for i in pair]])  # 0, 100, 1, 101, ...
    c = choose(S, I, 8, near_dup=NearDuplicateFilter(vectors, threshold=0.95))
    assert c.ids.tolist() == list(range(8))
    assert c.near_duplicates == {100 + i: i for i in range(7)}  # the fill stops at 7, before 107
    plain = choose(S, I, 8)
    assert plain.ids.tolist() == [0, 100, 1, 101, 2, 102, 3, 103]


def test_cluster_strategy_keeps_the_clusters_the_target_falls_into():
    rng = np.random.default_rng(3)
    centres = normalize(rng.normal(size=(4, 8))) * 4
    blobs = [normalize(c + rng.normal(size=(150, 8)) * 0.3) for c in centres]
    x = np.concatenate(blobs).astype(np.float32)
    ids = np.arange(len(x), dtype=np.int64) * 3
    blob_of = np.repeat(np.arange(4), 150)

    def pool():
        for a in range(0, len(x), 200):  # read in blocks, like shards of the embeddings store
            yield x[a : a + 200], ids[a : a + 200]

    centroids = train_clusters(x, 4, seed=0)
    xq = normalize(
        np.concatenate([centres[0] + rng.normal(size=(3, 8)) * 0.3, centres[2] + rng.normal(size=(1, 8)) * 0.3])
    )
    c, plan = choose_by_clusters(centroids, xq, pool, 100)
    assert plan.probes == 1 and len(plan.weights) == 2
    chosen_blobs = blob_of[c.ids // 3]
    assert set(chosen_blobs.tolist()) == {0, 2}
    assert np.bincount(chosen_blobs, minlength=4)[[0, 2]].tolist() == [75, 25], "weighted by target images"
    again, _ = choose_by_clusters(centroids, xq, pool, 100)
    np.testing.assert_array_equal(again.ids, c.ids)
    # class balance: both classes get half
    balanced, _ = choose_by_clusters(centroids, xq, pool, 100, query_class=np.array([0, 0, 0, 1]), balance="class")
    assert np.bincount(blob_of[balanced.ids // 3], minlength=4)[[0, 2]].tolist() == [50, 50]
    # a budget above the kept clusters' members makes each image fall into its next cluster too
    big, big_plan = choose_by_clusters(centroids, xq, pool, 400)
    assert big_plan.probes == 2 and len(big) == 400


def test_instance_streams_are_rank_major():
    S, I = _disjoint(nq=2, k=3)
    (stream,) = instance_streams(S, I)
    assert stream.ids.tolist() == [0, 1000, 1, 1001, 2, 1002]


def test_topk_share_gives_the_global_best_scores_their_share_and_the_rest_to_every_image():
    S, I = _disjoint()  # query 0's neighbours score highest, then query 1's...
    c = choose(S, I, 12, topk_share=0.5)
    per_image = np.bincount(c.chosen_by, minlength=4)
    # Half the budget by round robin (at least one from every image's best), half by top score,
    # which all comes from query 0's list.
    assert per_image.min() >= 1 and per_image[0] >= 6
    assert sorted(c.ids[c.chosen_by == 0].tolist()) == I[0, : per_image[0]].tolist()
    assert c.taken == [6, 6]
    assert len(set(c.ids.tolist())) == 12
    # The two ends: 0 is the round robin, 1 the global top-k.
    assert choose(S, I, 12, topk_share=0.0).ids.tolist() == choose(S, I, 12).ids.tolist()
    assert sorted(choose(S, I, 8, topk_share=1.0).ids.tolist()) == sorted(choose(S, I, 8, strategy="topk").ids.tolist())
    with pytest.raises(ValueError, match="topk_share"):
        choose(S, I, 12, topk_share=1.5)


def test_class_balanced_topk_gives_each_class_its_share_of_its_own_best_scores():
    S, I = _disjoint(nq=4)  # query 0's neighbours score highest
    cls = np.array([0, 0, 0, 1])
    glob = choose(S, I, 8, strategy="topk")
    assert set(glob.chosen_by.tolist()) == {0}  # one image's neighbours take everything
    by_class = choose(S, I, 8, strategy="topk", balance="class", query_class=cls)
    assert np.bincount(cls[by_class.chosen_by]).tolist() == [4, 4]
    assert sorted(by_class.ids[cls[by_class.chosen_by] == 0].tolist()) == I[0, :4].tolist()
    assert sorted(by_class.ids[cls[by_class.chosen_by] == 1].tolist()) == I[3, :4].tolist()
    # The default mix: half by each class's round robin, half by its top scores.
    mixed = choose(S, I, 12, balance="class", query_class=cls, topk_share=0.5)
    assert np.bincount(cls[mixed.chosen_by]).tolist() == [6, 6]
    # Class 0's round robin reaches each of its three images once, its top scores go to image 0.
    assert np.bincount(mixed.chosen_by, minlength=4).tolist() == [4, 1, 1, 6]


def _reference_fill(streams, budget, excluded):
    """The rule of ``fill`` written the plain way (a dict of chosen ids, a heap of turns): the compact one must agree."""
    import heapq

    chosen, out, taken, met = {}, [], [0] * len(streams), set()
    turns = [(0.0, s) for s, st in enumerate(streams) if st.weight > 0]
    heapq.heapify(turns)
    position = [0] * len(streams)
    while turns and len(out) < budget:
        _, s = heapq.heappop(turns)
        st = streams[s]
        while position[s] < len(st):
            p = position[s]
            position[s] += 1
            pid = int(st.ids[p])
            if pid in excluded:
                met.add(pid)
            if pid in chosen or pid in excluded:
                continue
            chosen[pid] = True
            out.append((pid, float(st.scores[p]), int(st.queries[p]), s))
            taken[s] += 1
            heapq.heappush(turns, (taken[s] / st.weight, s))
            break
    return out, len(met)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compact_fill_takes_what_the_plain_rule_takes_and_records_every_retriever(seed):
    from sept.index.strategies import fill, mix_streams, topk_streams

    rng = np.random.default_rng(seed)
    nq, k = 30, 12
    I = rng.integers(0, 120, (nq, k)).astype(np.int64)  # heavy overlap between the queries' lists
    S = np.sort(rng.uniform(0, 1, (nq, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    cls = rng.integers(0, 3, nq)
    excluded = set(rng.integers(0, 120, 15).tolist())
    streams = mix_streams(
        [
            instance_streams(S, I, cls, balance="class"),
            topk_streams(S, I, cls, balance="class"),
        ],
        [0.6, 0.4],
    )
    got = fill(streams, 70, excluded=excluded)
    want, met = _reference_fill(streams, 70, excluded)
    assert list(zip(got.ids.tolist(), got.scores.tolist(), got.chosen_by.tolist(), got.stream_of.tolist())) == want
    assert got.leaked_skipped == met > 0

    c = choose(S, I, 70, balance="class", query_class=cls, topk_share=0.4, excluded=excluded)
    for j, pid in enumerate(c.ids.tolist()):
        rows = sorted(set(np.nonzero(I == pid)[0].tolist()))
        assert c.retrieved_by[j] == rows and c.chosen_by[j] in rows
        assert c.scores[j] == S[I == pid].max()
    assert c.retrieved_by.counts().sum() == sum(len(r) for r in c.retrieved_by)


def test_the_mix_does_not_search_again_for_the_pool_wide_top_but_the_pure_topk_does():
    S, I = _disjoint(nq=4, k=5)  # query 0's scores beat everything beyond every other list's end
    assert choose(S, I, 8, strategy="topk").needs_more_neighbours
    mixed = choose(S, I, 8, topk_share=0.5)
    assert not mixed.needs_more_neighbours
    assert len(mixed) == 8 and np.bincount(mixed.chosen_by, minlength=4).max() <= 5  # no image takes more than k


def test_a_stream_that_runs_short_says_how_many_more_neighbours_would_fill_it():
    S, I = _disjoint(nq=2, k=3)  # six distinct candidates
    c = choose(S, I, 60)
    assert c.needs_more_neighbours and len(c) == 6
    assert c.neighbours_factor == pytest.approx(10.0)  # wanted 60, got 6 from k=3: ten times the neighbours
    assert choose(S, I, 4).neighbours_factor == 1.0  # filled, nothing more to ask
    S2, I2 = _disjoint(nq=4, k=5)
    assert choose(S2, I2, 8, strategy="topk").neighbours_factor == 2.0  # exactness: no shortfall to size from


@pytest.mark.parametrize("seed", [0, 1])
def test_candidate_near_duplicates_choose_what_the_accepted_set_search_chooses(seed):
    """The pairs-among-candidates rule (O(budget x pairs)) equals the search over everything accepted."""
    from sept.index.dedup import CandidateNearDuplicates

    rng = np.random.default_rng(seed)
    nq, k, d = 20, 15, 16
    base = normalize(rng.normal(size=(60, d)))
    pool = normalize(np.repeat(base, 5, axis=0) + 0.08 * rng.normal(size=(300, d)))  # groups of close copies
    ids = np.arange(300, dtype=np.int64) * 7 + 3
    I = ids[rng.integers(0, 300, (nq, k))]
    S = np.sort(rng.uniform(0, 1, (nq, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    vectors = dict(zip(ids.tolist(), pool))
    cand = np.unique(I)
    fast = CandidateNearDuplicates(cand, np.stack([vectors[i] for i in cand.tolist()]), 0.9)
    slow = NearDuplicateFilter({i: vectors[i] for i in cand.tolist()}, 0.9, dim=d)
    a = choose(S, I, 120, near_dup=fast)
    b = choose(S, I, 120, near_dup=slow)
    assert a.ids.tolist() == b.ids.tolist() and a.near_duplicates == b.near_duplicates
    assert len(a.near_duplicates) > 0, "the pool was built with close copies"


def test_close_pairs_through_an_ivf_find_nearly_every_pair(monkeypatch):
    import sept.index.dedup as dedup

    rng = np.random.default_rng(0)
    base = normalize(rng.normal(size=(2000, 32)))
    x = np.concatenate([base, normalize(base + 0.05 * rng.normal(size=base.shape))])
    exact = dedup.close_pairs(x, 0.95)
    monkeypatch.setattr(dedup, "EXACT_PAIRS_MAX", 100)
    approx = dedup.close_pairs(x, 0.95)
    found = lambda p: {(i, int(j)) for i in range(len(x)) for j in p[1][p[0][i] : p[0][i + 1]]}  # noqa: E731
    want, got = found(exact), found(approx)
    assert got <= want and len(want) >= 3000 and len(got) >= 0.9 * len(want)  # most copies are 0.95+ close


def test_streams_are_positions_into_the_search_results_not_copies():
    S, I = _disjoint(nq=3, k=4)
    from sept.index.strategies import topk_streams

    (rr,), (top,) = instance_streams(S, I), topk_streams(S, I)
    for stream in (rr, top):
        assert np.shares_memory(stream.source.ids, I) and np.shares_memory(stream.source.scores, S)
        assert stream.positions.dtype == np.int32
    assert rr.queries.tolist() == [0, 1, 2] * 4  # rank-major: the query is the position's row


@pytest.mark.parametrize("seed", [0, 1])
def test_block_size_never_changes_a_choice_its_retrievers_or_the_neighbours_shown(seed, monkeypatch):
    """Fill, retrievers and neighbours work a block of rows at a time; one row a block must agree with one block."""
    from sept.index import strategies

    rng = np.random.default_rng(seed)
    nq, k = 40, 12
    I = rng.integers(0, 150, (nq, k)).astype(np.int64)  # overlapping lists, repeats within a row
    S = np.sort(rng.uniform(0, 1, (nq, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    cls = rng.integers(0, 4, nq)

    def run():
        c = choose(S, I, 90, balance="class", query_class=cls, topk_share=0.5)
        shown = list(strategies.query_neighbours(c, [strategies.NeighbourBlock.whole(S, I)], nq, 5))
        return c, shown

    whole, shown_whole = run()
    monkeypatch.setattr(strategies, "_BLOCK", 5)  # fewer entries than a row: a row a block
    blocked, shown_blocked = run()
    for name in ("ids", "scores", "chosen_by", "stream_of"):
        np.testing.assert_array_equal(getattr(blocked, name), getattr(whole, name))
    assert list(blocked.retrieved_by) == list(whole.retrieved_by)
    assert shown_blocked == shown_whole
    for j, pid in enumerate(whole.ids.tolist()):
        assert whole.retrieved_by[j] == sorted(set(np.nonzero(I == pid)[0].tolist()))
    # Without search results, the neighbours shown are each query's own choices, best first.
    own = list(strategies.query_neighbours(whole, None, nq, 5))
    for q, pairs in enumerate(own):
        mine = sorted(
            zip(whole.ids[whole.chosen_by == q].tolist(), whole.scores[whole.chosen_by == q].tolist()),
            key=lambda t: (-t[1], t[0]),
        )[:5]
        assert pairs == [(i, float(s)) for i, s in mine]


@pytest.mark.parametrize("topk_share", [0.0, 0.5])
def test_a_block_per_class_chooses_what_one_block_of_the_same_results_chooses(topk_share):
    from sept.index.strategies import NeighbourBlock, choose_blocks, query_neighbours

    rng = np.random.default_rng(3)
    nq, k = 24, 10
    I = rng.integers(0, 100, (nq, k)).astype(np.int64)
    S = np.sort(rng.uniform(0, 1, (nq, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    cls = rng.integers(0, 3, nq)  # classes interleaved among the rows
    kw = dict(balance="class", query_class=cls, topk_share=topk_share)
    one = choose(S, I, 50, **kw)
    blocks = [NeighbourBlock(np.flatnonzero(cls == c), S[cls == c], I[cls == c]) for c in range(3)]
    split = choose_blocks(blocks, 50, **kw)
    for name in ("ids", "scores", "chosen_by", "stream_of"):
        np.testing.assert_array_equal(getattr(split, name), getattr(one, name))
    assert list(split.retrieved_by) == list(one.retrieved_by)
    assert list(query_neighbours(split, blocks, nq, 4)) == list(
        query_neighbours(one, [NeighbourBlock.whole(S, I)], nq, 4)
    )
    with pytest.raises(ValueError, match="spans two blocks"):
        choose_blocks(
            [NeighbourBlock(np.arange(12), S[:12], I[:12]), NeighbourBlock(np.arange(12, 24), S[12:], I[12:])], 50, **kw
        )
    with pytest.raises(ValueError, match="one block"):
        choose_blocks(blocks, 50)


def test_a_class_of_few_images_fills_its_share_from_its_own_longer_lists():
    """Class 0 has one image, class 1 has nine: with a k per class, one image's 20 neighbours fill
    class 0's half of the budget while class 1's images need only 2 each."""
    from sept.index.strategies import NeighbourBlock, choose_blocks

    few = NeighbourBlock(np.array([0]), np.linspace(0.9, 0.5, 20, dtype=np.float32)[None], np.arange(20)[None])
    many_rows = np.arange(1, 10)
    many = NeighbourBlock(
        many_rows,
        np.tile(np.array([0.8, 0.7], np.float32), (9, 1)),
        (1000 + 10 * many_rows[:, None] + np.arange(2)).astype(np.int64),
    )
    cls = np.array([0] + [1] * 9)
    c = choose_blocks([few, many], 36, balance="class", query_class=cls)
    assert np.bincount(cls[c.chosen_by]).tolist() == [18, 18]
    assert not c.needs_more_neighbours
    assert c.retrieved_by[int(np.flatnonzero(c.ids == 1010)[0])] == [1]
